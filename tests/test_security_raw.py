"""
Issue 6, "Bad input": raw bytes at a real Hestia, each refused with a 4xx, and
the test backend behind it receiving nothing.

One gateway serves the module, with small limits so that the tests are quick:
C{max_body_size: 1m}, C{max_header_size: 8k}, C{header_timeout: 1s},
C{connection_idle_timeout: 2s}.  Its C{echo} service is a real
C{tests/support/backend.py} whose C{--request-log} shows what got through.  Those tests
are marked C{integration}.

Issue 12 adds a Hypothesis property (marked C{unit}) that drives raw request
bytes through the daemon's own site in memory (hestia.testing.site): whatever the
bytes, Hestia never answers 5xx of its own nor logs a traceback, never opens a
tunnel without a backend C{101}, and a request reaches a backend only if it is
well-formed, inside one service's prefix and authorised.
"""

from __future__ import annotations

import re
import socket
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from support.hestiaproc import GRACEFUL, BackendSpec, HestiaProcess, RawResponse, raw_request, reap_leftovers, wait_for
from twisted.logger import globalLogPublisher

from hestia.config import SERVICE_NAME
from hestia.testing import ADMIN_TOKEN, ECHO_TOKEN, MemoryHestia


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


@pytest.mark.integration
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


@pytest.mark.integration
def test_a_head_beyond_the_limit_is_431(gw: Gateway) -> None:
    refused(gw, ECHO + b"X-Big: " + b"a" * 9000, status=431)
    many = b"".join(b"X-H%d: %s\r\n" % (n, b"b" * 90) for n in range(100))
    refused(gw, ECHO + many.rstrip(b"\r\n"), status=431)
    refused(gw, b"GET /services/echo/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw", status=431)


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_a_body_within_the_limit_is_forwarded_whole(gw: Gateway) -> None:
    body = b"y" * (1024 * 1024)
    response = raw_request(gw.port, ECHO + b"Content-Length: %d" % len(body), body)
    assert response.status == 200 and response.json()["body_len"] == len(body)


# -- never an open proxy --------------------------------------------------------------


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
@pytest.mark.parametrize("name", [b"Echo", b"-echo", b"_echo", b"ech%6f", b"echo%00", b"e.cho", b"%65cho", b"%C3%A9"])
def test_names_outside_the_pattern_are_404(gw: Gateway, name: bytes) -> None:
    refused(gw, b"GET /services/" + name + b"/echo HTTP/1.1\r\nHost: gw", status=404)


@pytest.mark.integration
def test_malformed_heads_get_a_json_400(gw: Gateway) -> None:
    refused(gw, b"GET /services/echo/echo HTTP/1.1\r\nHost: gw\r\nBad Header: x")
    refused(gw, b"GET /services/echo/echo HTTP/1.1\r\nHost: gw\r\nX: a\x00b")
    refused(gw, b"GET /services/echo/echo\r\nHost: gw")


# -- slow and idle clients ---------------------------------------------------------------


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


# -- a refused upgrade, on real sockets (issue 12, hole 1) --------------------------------------


def _read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except OSError:
        pass
    return answer


@pytest.mark.integration
def test_a_refused_upgrade_leaves_no_tunnel(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /services/echo/status/404 HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        first = b""
        while b"status 404" not in first:
            data = sock.recv(65536)
            assert data, first
            first += data
        assert first.startswith(b"HTTP/1.1 404 "), first
        # The same connection is HTTP still: Hestia parses and refuses this one.
        sock.sendall(b"GET /services/echo/../../v1/services HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        second = _read_until_closed(sock)
    assert second.startswith(b"HTTP/1.1 400 "), second
    assert b"escapes" in second
    assert not gw.echo.requests("/services/echo/../")
    assert not [entry for entry in gw.echo.requests() if "v1" in entry["path"]]


# -- the property: raw bytes through the server protocol, in memory ------------------------------


_METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"CONNECT", b"BREW", b"G T", b"get"]
_PREFIXES = [b"/services/Echo/", b"/services/%65cho/", b"/services/echo", b"/services/nope/", b"/services/",
             b"/v1/services", b"/v1/health", b"/v1/reload", b"/%761/services", b"/", b"//services/echo/",
             b"http://evil.example/", b"*", b"services/echo/"]
_PIECES = [b"..", b"%2e%2e", b".%2e", b"..;", b"..;x=1", b"%c0%ae%c0%ae", b"%ef%bc%8e%ef%bc%8e",
           b"%252e%252e", b"..%5c", b"\\", b"%2f", b"%00", b";", b"?status=404", b"?status=500", b"?q=../x",
           b"\x7f", b"\xff", b"\xc3\xa9", b"%u002e%u002e", b"v1", b"other", b"", b" "]
_TOKENS = [ADMIN_TOKEN, ECHO_TOKEN, "wrong", ""]


def _often(common: list[bytes], rare: list[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly one of C{common}, sometimes one of C{rare}: valid requests with the odd bad part."""
    return st.one_of(st.sampled_from(common), st.sampled_from(common), st.sampled_from(common), st.sampled_from(rare))


_HOSTS = _often([b"Host: gw"], [b"Host: gw:8080", b"Host: [::1]", b"Host: g w", b"Host: a@b", b"Host:",
                                b"Host: gw\r\nHost: gw", b"X-No-Host: 1"])
_CREDENTIALS = st.one_of(
    st.just(b""),
    st.sampled_from(_TOKENS).map(lambda token: b"X-Hestia-Token: " + token.encode()),
    st.sampled_from(_TOKENS).map(lambda token: b"Authorization: Bearer " + token.encode()),
    st.sampled_from(_TOKENS).map(lambda token: b"X-Hestia-Token: \r\nAuthorization: Bearer " + token.encode()),
)
_FRAMINGS = _often(
    [b""],
    [b"Content-Length: 0", b"Content-Length: 3", b"Content-Length: 70", b"Content-Length: -1",
     b"Content-Length: 3, 3", b"Content-Length: 99999999999", b"Transfer-Encoding: chunked",
     b"Transfer-Encoding: identity", b"Transfer-Encoding: gzip", b"Expect: 100-continue",
     b"Content-Length: 3\r\nTransfer-Encoding: chunked", b"Content-Length: 3\r\nExpect: 100-continue",
     b"Transfer-Encoding: chunked\r\nExpect: 100-continue"])
_WEBSOCKET = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13"
_EXTRAS = st.sampled_from([
    _WEBSOCKET,
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
    b"Connection: Upgrade\r\nUpgrade: websocket, h2c", b"Upgrade: websocket", b"HTTP2-Settings: AAMAAABkAAQAAP__",
    b"Connection: close", b"X-Request-ID: \x01", b"X-A: b\x00c", b"Bad Header: x", b" folded",
    b"X-Forwarded-For: 1.2.3.4", b"Accept: text/html",
])
_BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=80),
    st.sampled_from([b"abc", b"3\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffffff\r\n",
                     b"0\r\n\r\nGET /v1/services HTTP/1.1\r\nHost: gw\r\n\r\n", b"5\r\nab", b"x;y\r\n"]),
)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    prefix = draw(_often([b"/services/echo/", b"/services/other/"], _PREFIXES))
    target = prefix + b"/".join(draw(st.lists(_often([b"a", b"ws", b"b.txt"], _PIECES), max_size=4)))
    version = draw(_often([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""]))
    line = draw(_often([b"GET", b"POST"], _METHODS)) + b" " + target + (b" " + version if version else b"")
    headers = [draw(_HOSTS), draw(_CREDENTIALS), draw(_FRAMINGS), *draw(st.lists(st.one_of(_EXTRAS, st.just(_WEBSOCKET)), max_size=2))]
    data = b"\r\n".join([line, *(header for header in headers if header)]) + b"\r\n\r\n" + draw(_BODIES)
    if draw(st.integers(0, 4)) == 0:  # a byte changed, inserted or cut: garbage near the valid
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["change", "insert", "cut"]))
        byte = bytes([draw(st.integers(0, 255))])
        data = data[:at] + (byte if how != "cut" else b"") + data[at + (0 if how == "insert" else 1):]
    return data


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, head) of each response in a client's bytes."""
    found = []
    for match in re.finditer(rb"(?:^|\n)(HTTP/1\.[01] (\d{3})[^\r\n]*\r\n(?:.*?\r\n)?\r\n)", raw, re.S):
        found.append((int(match.group(2)), match.group(1)))
    return found


def _dot_dot(path: bytes) -> bool:
    """An oracle apart from the gateway's own: a '..' segment in any decoding a backend might apply."""
    texts = []
    for _ in range(5):
        for text in (path.decode("latin-1"), path.decode("utf-8", "replace"),
                     unicodedata.normalize("NFKC", path.decode("utf-8", "replace"))):
            texts.append(text.replace("\u0000", "").replace("%u002e", ".").replace("%U002E", "."))
        path = unquote_to_bytes(path.replace(b"\xc0\xae", b".").replace(b"\xc0\xaf", b"/"))
    return any(segment.split(";")[0].strip() == ".." for text in texts for segment in re.split(r"[/\\]", text))


def _allowed(request: Any, service: str, auth: bool) -> bool:
    """The documented token rule, written out again: X-Hestia-Token unless empty, else Bearer."""
    if not auth:
        return True
    headers = request.requestHeaders
    presented = next((v.strip() for v in headers.getRawHeaders(b"x-hestia-token", []) if v.strip()), None)
    if presented is None:
        for value in headers.getRawHeaders(b"authorization", []):
            match = re.match(rb"^\s*bearer\s+(\S+)\s*$", value, re.I)
            if match:
                presented = match.group(1)
                break
    grants = {ADMIN_TOKEN.encode(): {"echo", "other"}, ECHO_TOKEN.encode(): {"echo"}}
    return service in grants.get(presented or b"", set())


def _well_formed_for(request: Any, service: str) -> bool:
    """The request as Twisted parsed it is one Hestia may forward to C{service} (Host: RFC 3986 characters)."""
    headers = request.requestHeaders
    hosts = headers.getRawHeaders(b"host", [])
    host_ok = (len(hosts) == 1 and re.fullmatch(rb"[A-Za-z0-9._~!$&'()*+,;=%:\[\]-]*", hosts[0]) is not None) or (
        not hosts and request.clientproto != b"HTTP/1.1")
    base = b"/services/" + service.encode()
    uri = request.uri
    inside = uri == base or uri.startswith((base + b"/", base + b"?"))
    return (
        SERVICE_NAME.match(service) is not None
        and re.fullmatch(rb"[\x21-\x7e]+", uri) is not None
        and inside
        and host_ok
        and not (headers.hasHeader(b"content-length") and headers.hasHeader(b"transfer-encoding"))
        and not _dot_dot(uri.split(b"?", 1)[0])
    )


@pytest.mark.unit
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(_requests(), min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 400), max_size=4),
    upgrade_answer=st.sampled_from([None, 101, 404, 200, 500]),
    later=st.one_of(st.just(b""), _requests()),
    auth=st.booleans(),
)
def test_whatever_the_bytes_the_gateway_holds(stream: list[bytes], cuts: list[int], upgrade_answer: int | None,
                                              later: bytes, auth: bool) -> None:
    note(f"stream={stream!r} cuts={cuts!r} upgrade_answer={upgrade_answer!r} later={later!r} auth={auth!r}")
    failures: list[object] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event.get("log_failure") or event)

    globalLogPublisher.addObserver(observe)
    try:
        hestia = MemoryHestia(auth=auth)
        client = hestia.connect()
        data = b"".join(stream)
        for cut in sorted(cuts):  # the same bytes, in arbitrary reads
            head, data = data[:cut], data[cut:]
            client.send(head)
        client.send(data)
        answered_101 = False
        for connection in hestia.upgrades.connections:
            if upgrade_answer == 101:
                connection.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
                                  b"\r\nX-From-Backend: 1\r\n\r\n")
                answered_101 = True
            elif upgrade_answer is not None:
                connection.answer(b"HTTP/1.1 %d Nope\r\nX-From-Backend: 1\r\nContent-Length: 2\r\n\r\nno"
                                  % upgrade_answer)
        hestia.settle()
        client.send(later)
        hestia.advance(120, step=5)  # every deadline passes
    finally:
        globalLogPublisher.removeObserver(observe)

    raw = client.received()
    for status, head in _responses(raw if not client.taken_over else raw.split(b"HTTP/1.1 101 ")[0]):
        assert status < 500 or b"X-From-Backend: 1" in head, (status, head, raw)
    assert not failures, failures
    if client.taken_over:
        assert answered_101
    reached = [request.requestHeaders.getRawHeaders(b"x-request-id", [b""])[0] for request in hestia.backend.seen]
    reached += [re.search(rb"(?im)^x-request-id: (\S+)\r$", connection.sent()).group(1)  # type: ignore[union-attr]
                for connection in hestia.upgrades.connections]
    event(f"reached the backend: {len(reached)}")
    event(f"tunnel: {client.taken_over}, upgrade connections: {len(hestia.upgrades.connections)}")
    for request_id in reached:
        exchange = hestia.gateway.exchanges[request_id]
        service = exchange.lifecycle.name
        assert _well_formed_for(exchange.request, service), exchange.request.uri
        assert _allowed(exchange.request, service, auth), exchange.request.requestHeaders


# -- tokens in the environment of the processes Hestia starts ------------------------------------


@pytest.mark.integration
def test_hestias_token_variables_do_not_reach_the_processes_it_starts(tmp_path: Path) -> None:
    # Found attacking a running Hestia: every process it started (a service's
    # command, an exec backend's start/stop) inherited its environment, with
    # the value of each auth token_env (the admin token too), so anybody who
    # can run code in a service (a notebook) could read the admin token.
    echo = BackendSpec("echo", tmp_path)
    dumped = tmp_path / "process.env"
    exec_dumped = tmp_path / "exec.env"
    service = echo.service()
    service["command"] = f"env > {dumped}; {service['command']}"  # a shell line already
    config = {
        "services": {
            "echo": {**service, "env": {"GIVEN_BY_CONFIG": "kept"}},
            "box": {"url": echo.url, "exec": {"start": f"env > {exec_dumped}", "stop": "true"}},
        },
        "auth": {"tokens": [{"name": "admin", "token_env": "TEST_ADMIN_SECRET", "scopes": ["admin"]},
                            {"name": "ci", "token_env": "TEST_CI_SECRET", "services": ["echo"]}]},
    }
    hestia = HestiaProcess(config, tmp_path / "hestia", env={
        "TEST_ADMIN_SECRET": "admin-secret-value", "TEST_CI_SECRET": "ci-secret-value",
        "HESTIA_TOKEN": "cli-secret-value", "UNRELATED_VARIABLE": "inherited",
    }).start()
    try:
        head = b"GET /services/%s/health HTTP/1.1\r\nHost: gw\r\nX-Hestia-Token: admin-secret-value"
        assert raw_request(hestia.port, head % b"echo").status == 200
        assert raw_request(hestia.port, head % b"box").status == 200
        for path in (dumped, exec_dumped):
            environment = path.read_text(encoding="utf-8")
            assert "UNRELATED_VARIABLE=inherited" in environment  # Hestia's environment is passed on ...
            for secret in ("admin-secret-value", "ci-secret-value", "cli-secret-value"):
                assert secret not in environment, (path.name, secret)  # ... less its secrets.
        assert "GIVEN_BY_CONFIG=kept" in dumped.read_text(encoding="utf-8")
    finally:
        status = hestia.stop()
        wait_for(lambda: not echo.running(), 5.0)
        reap_leftovers(str(tmp_path))
        assert status in GRACEFUL, hestia.log_text()
