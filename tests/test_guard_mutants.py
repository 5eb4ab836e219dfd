"""
Request hygiene (hestia.guard) in memory: a GuardedSite's protocol over a StringTransport, its
timers on a Clock.  Mutation testing (issue 21) found no fast test of it at all; the process
tests (test_security_raw.py) stay the proof over real sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyChannel

from hestia.config import parse_config
from hestia.guard import (
    GuardedRequest,
    GuardedSite,
    Limits,
    Refusal,
    error_response,
    raise_open_file_limit,
    refusal,
    set_no_delay,
)

pytestmark = pytest.mark.unit


class Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.bodies.append(request.content.read())
        return b"served"


class Connection:
    def __init__(self, limits: Limits | None = None) -> None:
        self.clock = Clock()
        self.resource = Recorder()
        self.site = GuardedSite(self.resource, limits or Limits(max_body_size=100, max_header_size=1024,
                                                                header_timeout=5, idle_timeout=30))
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
        self.protocol.callLater = self.clock.callLater  # the channel's timers (Twisted's own hook)
        self.protocol._channel.callLater = self.clock.callLater
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def status(self) -> int:
        return int(self.transport.value().split(b" ", 2)[1])

    def error(self) -> dict[str, Any]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head and b"Connection: close" in head
        decoded: dict[str, Any] = json.loads(body)
        assert decoded["service"] is None and decoded["state"] is None
        return decoded

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def test_an_ordinary_request_is_served() -> None:
    connection = Connection()
    connection.send(b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello")
    assert connection.status() == 200 and connection.resource.bodies == [b"hello"]
    assert b"served" in connection.transport.value() and not connection.closed


def test_connect_is_405_and_absolute_targets_400() -> None:
    connect = Connection()
    connect.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert connect.status() == 405 and connect.closed
    assert "not a forward proxy" in connect.error()["error"]
    absolute = Connection()
    absolute.send(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert absolute.status() == 400 and absolute.closed
    assert absolute.error()["error"].startswith("only origin-form targets")
    assert connect.resource.bodies == [] and absolute.resource.bodies == []


def test_options_star_is_allowed() -> None:
    connection = Connection()
    connection.send(b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert connection.status() == 200 and not connection.closed


def test_content_length_with_transfer_encoding_is_400() -> None:
    connection = Connection()
    connection.send(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: identity\r\n\r\nabc")
    assert connection.status() == 400 and connection.closed
    assert connection.error()["error"] == "Content-Length together with Transfer-Encoding is ambiguous"
    assert connection.resource.bodies == []


def test_a_declared_body_over_the_limit_is_413_before_it_is_read() -> None:
    connection = Connection()
    connection.send(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n")
    assert connection.status() == 413 and connection.closed
    assert b"100 Continue" not in connection.transport.value()
    assert connection.error()["error"] == "request body larger than 100 bytes"
    connection.send(b"x" * 101)  # ignored: nothing more is parsed
    assert connection.resource.bodies == []


def test_a_body_of_exactly_the_limit_and_no_limit_at_all_are_served() -> None:
    exact = Connection()
    exact.send(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    assert exact.status() == 200 and exact.resource.bodies == [b"x" * 100]
    unlimited = Connection(Limits(max_body_size=0))
    unlimited.send(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
    assert unlimited.status() == 200 and unlimited.resource.bodies == [b"x" * 5000]


def test_a_chunked_body_is_cut_at_the_limit() -> None:
    connection = Connection()
    connection.send(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    connection.send(b"32\r\n" + b"a" * 50 + b"\r\n")
    assert connection.transport.value() == b""
    connection.send(b"33\r\n" + b"b" * 51 + b"\r\n0\r\n\r\n")
    assert connection.status() == 413 and connection.closed
    assert connection.resource.bodies == []


def test_a_chunked_body_within_the_limit_is_served() -> None:
    connection = Connection()
    connection.send(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"32\r\n" + b"a" * 50 + b"\r\n32\r\n" + b"b" * 50 + b"\r\n0\r\n\r\n")
    assert connection.status() == 200 and connection.resource.bodies == [b"a" * 50 + b"b" * 50]


def test_a_head_over_the_limit_is_431() -> None:
    many = Connection()
    many.send(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(30)))
    assert many.status() == 431 and many.closed
    assert many.error()["error"] == "request head larger than 1024 bytes"
    long_line = Connection()
    long_line.send(b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\n")
    assert long_line.status() == 431 and long_line.closed


def test_malformed_heads_get_a_json_400() -> None:
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n")
    assert connection.status() == 400 and connection.closed
    assert connection.error()["error"] == "malformed request"


def test_the_head_must_arrive_within_the_header_timeout_from_its_first_byte() -> None:
    connection = Connection()
    # Before any byte only the idle timer runs.
    assert [call.getTime() for call in connection.clock.getDelayedCalls()] == [30.0]
    connection.send(b"GET / HTTP/1.1\r\n")
    connection.clock.advance(4.9)
    connection.send(b"Host: gw\r\n")  # trickling does not restart the clock
    assert connection.transport.value() == b""
    connection.clock.advance(0.1)
    assert connection.status() == 408 and connection.closed
    assert connection.error()["error"] == "request head not received within 5s"


def test_a_complete_head_stops_the_head_clock() -> None:
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert connection.status() == 200
    connection.clock.advance(10)
    assert b"408" not in connection.transport.value()
    # The next request on the connection gets a fresh head clock of its own.
    connection.transport.clear()
    connection.send(b"GET /again HTTP/1.1\r\n")
    connection.clock.advance(4.9)
    assert connection.transport.value() == b""
    connection.clock.advance(0.1)
    assert connection.status() == 408


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    connection.clock.advance(29.9)
    assert not connection.closed
    connection.clock.advance(0.2)
    assert connection.closed


def test_losing_the_connection_cancels_the_head_timer() -> None:
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\n")
    connection.protocol.connectionLost(None)
    assert all(not call.active() for call in connection.clock.getDelayedCalls())


def test_limits_come_from_the_server_section_and_reloads_change_them() -> None:
    server = parse_config({"server": {"max_body_size": "1k", "max_header_size": "2k", "header_timeout": 3,
                                      "connection_idle_timeout": 7}}, "t.yml", {}).server
    limits = Limits.from_server(server)
    assert limits == Limits(max_body_size=1024, max_header_size=2048, header_timeout=3.0, idle_timeout=7.0)
    site = GuardedSite(Recorder(), limits)
    assert site.timeOut == 7.0
    site.set_limits(Limits(idle_timeout=9))
    assert site.limits == Limits(idle_timeout=9) and site.timeOut == 9
    assert GuardedSite(Recorder()).limits == Limits()


def test_refusal_and_error_response_are_exact() -> None:
    assert refusal(b"GET", b"/x") is None
    assert refusal(b"OPTIONS", b"*") is None
    assert refusal(b"GET", b"*")[0] == 400  # type: ignore[index]
    assert refusal(b"CONNECT", b"/x")[0] == 405  # type: ignore[index]
    assert refusal(b"GET", b"x/y")[0] == 400  # type: ignore[index]
    response = error_response(Refusal(413, "too big"))
    body = b'{"error": "too big", "service": null, "state": null}\n'
    assert response == (b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body
    assert error_response(Refusal(418, "x")).startswith(b"HTTP/1.1 418 Error\r\n")
    for status, reason in ((400, b"Bad Request"), (405, b"Method Not Allowed"), (408, b"Request Timeout"),
                           (431, b"Request Header Fields Too Large")):
        assert error_response(Refusal(status, "r")).startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason))


def guarded_request(method: bytes, uri: bytes, limits: Limits | None = None) -> tuple[GuardedRequest, Any]:
    channel = DummyChannel()
    if limits is not None:
        channel.limits = limits  # type: ignore[attr-defined]
    request = GuardedRequest(channel)
    request.method, request.uri = method, uri
    request.clientproto = b"HTTP/2"
    return request, channel


def test_an_http2_stream_gets_the_request_checks() -> None:
    request, channel = guarded_request(b"CONNECT", b"example.com:443")
    request.process()
    assert request.code == 405 and request.finished
    written = channel.transport.written.getvalue()
    assert b"not a forward proxy" in written


def test_an_http2_body_over_the_limit_is_413_when_it_completes() -> None:
    request, channel = guarded_request(b"POST", b"/x", Limits(max_body_size=10))
    request.gotLength(None)
    request.handleContentChunk(b"x" * 6)
    request.handleContentChunk(b"x" * 6)
    request.handleContentChunk(b"x" * 6)  # no longer stored
    request.content.seek(0)
    assert request.content.read() == b"x" * 6
    request.process()
    assert request.code == 413
    assert b"request body larger than 10 bytes" in channel.transport.written.getvalue()


def test_set_no_delay_tolerates_transports_without_it() -> None:
    calls: list[bool] = []

    class Tcp:
        def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 -- Twisted's name
            calls.append(enabled)

    class Gone:
        def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
            raise OSError("not a socket")

    set_no_delay(Tcp())
    set_no_delay(Gone())
    set_no_delay(object())
    assert calls == [True]


def test_raise_open_file_limit_reaches_the_hard_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        now = raise_open_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
        expected = hard if hard != resource.RLIM_INFINITY else max(lowered, 1 << 20)
        assert now == expected and now > lowered
        assert raise_open_file_limit() == now  # already there: unchanged
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_http2_streams_take_the_sites_limits_or_the_defaults() -> None:
    channel = DummyChannel()
    channel.site = Site(Resource())  # DummyChannel's own site is shared by every DummyChannel
    channel.site.limits = Limits(max_body_size=4)  # an H2 stream has no limits: its site has
    request = GuardedRequest(channel)
    request.method, request.uri, request.clientproto = b"POST", b"/x", b"HTTP/2"
    request.gotLength(None)
    request.handleContentChunk(b"12345")
    request.process()
    assert request.code == 413
    written = channel.transport.written.getvalue()
    head, _, body = written.partition(b"\r\n\r\n")
    assert json.loads(body) == {"error": "request body larger than 4 bytes", "service": None, "state": None}
    assert b"content-type: application/json" in head.lower()

    default = GuardedRequest(DummyChannel())
    default.gotLength(None)
    default.handleContentChunk(b"x" * 100_000)  # far below the default 4 GiB
    default.content.seek(0)
    assert len(default.content.read()) == 100_000


def test_a_refusal_is_logged_with_the_peer_and_the_reason() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    logged: list[dict[str, object]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        Connection().send(b"CONNECT x:443 HTTP/1.1\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert "refused a request from 10.0.0.1: 405 CONNECT is not served: Hestia is not a forward proxy" in [
        formatEvent(event) for event in logged]
