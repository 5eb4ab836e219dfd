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
from hestia.loader import parse_config

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


# -- after the merge of the HTTP hardening ---------------------------------------------------


def test_error_response_challenges_a_401_and_says_when_to_retry() -> None:
    challenged = error_response(Refusal(401, "authentication required", service="app"))
    head, _, body = challenged.partition(b"\r\n\r\n")
    assert b'WWW-Authenticate: Bearer realm="hestia"' in head.split(b"\r\n")
    assert json.loads(body) == {"error": "authentication required", "service": "app", "state": None}
    slow = error_response(Refusal(429, "slow down", retry_after=2.6))
    head, _, body = slow.partition(b"\r\n\r\n")
    assert b"Retry-After: 3" in head.split(b"\r\n") and b"WWW-Authenticate" not in head
    assert json.loads(body)["retry_after"] == 3
    assert b"Retry-After: 1\r\n" in error_response(Refusal(429, "x", retry_after=0.1))
    assert b"Retry-After" not in error_response(Refusal(400, "x"))


@pytest.mark.parametrize(
    ("values", "version", "problem"),
    [([b"a", b"b"], b"HTTP/1.1", "more than one Host header"),
     ([], b"HTTP/1.1", "an HTTP/1.1 request needs a Host header"),
     ([], b"HTTP/1.0", None),
     ([b"gw:8080"], b"HTTP/1.1", None),
     ([b"[::1]:80"], b"HTTP/1.1", None),
     ([b"gw:65536"], b"HTTP/1.1", "the port in Host is out of range"),
     ([b"gw:65535"], b"HTTP/1.1", None),
     ([b"bad host"], b"HTTP/1.1", "Host is not a host name, an IP address or an [IP literal], with an optional :port")],
)
def test_host_problems(values: list[bytes], version: bytes, problem: str | None) -> None:
    from hestia.guard import host_problem

    assert host_problem(values, version) == problem


def test_a_request_without_host_or_with_two_is_refused_on_the_wire() -> None:
    missing = Connection()
    missing.send(b"GET / HTTP/1.1\r\n\r\n")
    assert missing.status() == 400 and missing.error()["error"] == "an HTTP/1.1 request needs a Host header"
    two = Connection()
    two.send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert two.status() == 400 and two.closed
    assert refusal(b"GET", b"/\xc3\xa9")[0] == 400  # type: ignore[index]
    assert "visible ASCII" in refusal(b"GET", b"/a b")[1]  # type: ignore[index]


# -- second round (issue 21): a resource refusing from the head, over HTTP/1.1 and HTTP/2 ---------


class _Denied:
    """What a head check answers (the shape IHeadCheck's check_head returns)."""

    def __init__(self, status: int, reason: str, service: str | None, retry_after: float | None) -> None:
        self.status, self.reason, self.service, self.retry_after = status, reason, service, retry_after


def head_checked_tree(status: int, retry_after: float | None) -> tuple[Resource, Recorder]:
    """A root whose child /limited refuses every request from its head alone."""
    from zope.interface import implementer

    from hestia.interfaces import IHeadCheck

    @implementer(IHeadCheck)
    class Limited(Recorder):
        def check_head(self, request: Any) -> _Denied:
            return _Denied(status, "not you", "app", retry_after)

    root = Resource()
    limited = Limited()
    root.putChild(b"limited", limited)
    return root, limited


def test_a_head_refusal_over_http11_carries_the_service_the_challenge_and_retry_after() -> None:
    connection = Connection()
    root, limited = head_checked_tree(401, 2.6)
    connection.site.resource = root
    connection.send(b"POST /limited?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello")
    assert connection.status() == 401 and connection.closed and limited.bodies == []
    head, _, body = connection.transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert b'WWW-Authenticate: Bearer realm="hestia"' in lines and b"Retry-After: 3" in lines
    assert json.loads(body) == {"error": "not you", "service": "app", "state": None, "retry_after": 3}


def test_exactly_max_headers_then_a_malformed_line_is_a_400_not_a_431() -> None:
    connection = Connection(Limits(max_header_size=1 << 20))
    many = b"".join(b"X-%d: v\r\n" % n for n in range(500))
    connection.send(b"GET / HTTP/1.1\r\nHost: gw\r\n" + many[: -len(b"X-499: v\r\n")] + b"no colon here\r\n\r\n")
    assert connection.status() == 400 and connection.error()["error"] == "malformed request"
    over = Connection(Limits(max_header_size=1 << 20))
    over.send(b"GET / HTTP/1.1\r\nHost: gw\r\n" + many + b"\r\n")
    assert over.status() == 431 and over.error()["error"] == "more than 500 header fields"


def h2_stream(root: Resource, limits: Limits, headers: dict[bytes, bytes], method: bytes = b"POST",
              uri: bytes = b"/limited?x=1") -> tuple[GuardedRequest, Any, Clock]:
    """A GuardedRequest as Twisted's H2Stream makes it: the head is in, no DATA yet."""
    clock = Clock()
    channel = DummyChannel()
    channel.site = GuardedSite(root, limits)
    channel.site.reactor = clock
    channel.command, channel.path = method, uri
    request = GuardedRequest(channel)
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    request.parseCookies()
    return request, channel, clock


def answered(request: GuardedRequest, channel: Any) -> tuple[Any, Any]:
    request.method, request.uri, request.clientproto = channel.command, channel.path, b"HTTP/2"
    request.process()
    body = channel.transport.written.getvalue().partition(b"\r\n\r\n")[2]
    return request.responseHeaders, json.loads(body)


def test_a_head_refusal_over_http2_is_answered_with_retry_after_and_no_100_continue() -> None:
    root, limited = head_checked_tree(429, 0.2)
    request, channel, _ = h2_stream(root, Limits(), {b"host": b"gw", b"content-length": b"5",
                                                     b"expect": b"100-continue"})
    assert not request.requestHeaders.hasHeader(b"expect")
    request.handleContentChunk(b"hello")
    headers, document = answered(request, channel)
    assert request.code == 429 and limited.bodies == []
    assert document == {"error": "not you", "service": "app", "state": None, "retry_after": 1}
    assert headers.getRawHeaders(b"retry-after") == [b"1"] and not headers.hasHeader(b"www-authenticate")
    assert headers.getRawHeaders(b"content-length") == [str(len(channel.transport.written.getvalue().partition(
        b"\r\n\r\n")[2])).encode()]


def test_a_401_over_http2_is_challenged() -> None:
    root, _ = head_checked_tree(401, None)
    request, channel, _ = h2_stream(root, Limits(), {b"host": b"gw", b"content-length": b"5"})
    headers, document = answered(request, channel)
    assert request.code == 401 and headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="hestia"']
    assert "retry_after" not in document and not headers.hasHeader(b"retry-after")


def test_an_http2_body_has_its_deadline_pushed_back_by_what_arrives() -> None:
    from twisted.logger import capturedLogs, formatEvent

    root = Resource()
    root.putChild(b"limited", Recorder())
    request, channel, clock = h2_stream(root, Limits(body_timeout=10, body_min_rate=1000),
                                        {b"host": b"gw", b"content-length": b"5000"})
    aborted: list[bool] = []
    channel.abortConnection = lambda: aborted.append(True)
    request.gotLength(5000)
    request.handleContentChunk(b"x" * 5000)  # 5 s more at 1000 bytes/s
    clock.advance(14.9)
    assert aborted == []
    with capturedLogs() as captured:
        clock.advance(0.2)
    assert aborted == [True]
    assert ("reset an HTTP/2 stream whose body was not received in time (body_timeout 10s)"
            in [formatEvent(event) for event in captured])


# -- third round (issue 21, seed 11): the HTTP/1.1 head's checks, HTTP/2 head checks --------------


def test_the_body_deadline_settings_come_from_the_server_section_too() -> None:
    server = parse_config({"server": {"body_timeout": 4, "body_min_rate": 7}}, "t.yml", {}).server
    limits = Limits.from_server(server)
    assert limits.body_timeout == 4.0 and limits.body_min_rate == 7


def test_a_chunk_size_line_in_pieces_is_counted_once() -> None:
    connection = Connection()
    connection.send(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    connection.send(b"3c\r\n" + b"a" * 60 + b"\r\n")
    connection.send(b"2")  # the next size line, not yet complete
    connection.send(b"8\r\n" + b"b" * 40 + b"\r\n0\r\n\r\n")
    assert connection.status() == 200 and connection.resource.bodies == [b"a" * 60 + b"b" * 40]


def test_a_head_check_sees_the_path_up_to_the_first_question_mark_and_the_version() -> None:
    connection = Connection()
    root, limited = head_checked_tree(401, None)
    seen: list[bytes] = []
    check = type(limited).check_head
    type(limited).check_head = lambda self, request: (seen.append(request.clientproto), check(self, request))[1]
    connection.site.resource = root
    connection.send(b"POST /limited?x=1?y=2 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello")
    assert connection.status() == 401 and limited.bodies == []
    assert seen == [b"HTTP/1.1"]


def test_an_http2_get_with_a_body_is_checked_from_its_head_and_one_without_is_not() -> None:
    root, limited = head_checked_tree(401, None)
    request, channel, _ = h2_stream(root, Limits(), {b"host": b"gw", b"content-length": b"5"}, method=b"GET")
    request.handleContentChunk(b"hello")
    answered(request, channel)
    assert request.code == 401 and limited.bodies == []
    root, limited = head_checked_tree(401, None)
    request, channel, _ = h2_stream(root, Limits(), {b"host": b"gw", b"expect": b"100-continue"}, method=b"GET")
    # Not judged from the head: the resource decides when it renders, as for HTTP/1.1.
    assert rendered_unrefused(request, channel, limited, b"") == [b""]


def rendered_unrefused(request: GuardedRequest, channel: Any, resource: Recorder, data: bytes,
                       uri: bytes = b"/limited") -> list[bytes]:
    """Feed the body and process: what the resource received, after checking nothing was refused."""
    assert request.requestHeaders.getRawHeaders(b"expect", [b"100-continue"]) == [b"100-continue"]
    request.gotLength(len(data))
    if data:
        request.handleContentChunk(data)
    request.content.seek(0)
    request.method, request.uri, request.clientproto = channel.command or b"POST", uri, b"HTTP/2"
    request.path = uri
    request.process()
    written = channel.transport.written.getvalue()
    assert request.code == 200 and written.endswith(b"served"), written
    return resource.bodies


def test_an_http2_head_without_a_request_line_or_a_guarded_site_is_left_alone() -> None:
    root, limited = head_checked_tree(401, None)
    request, channel, _ = h2_stream(root, Limits(), {b"host": b"gw", b"content-length": b"5",
                                                     b"expect": b"100-continue"}, uri=None)  # type: ignore[arg-type]
    assert rendered_unrefused(request, channel, limited, b"hello") == [b"hello"]
    root, limited = head_checked_tree(401, None)
    channel = DummyChannel()
    channel.site = Site(root)
    channel.command, channel.path = b"POST", b"/limited"
    plain = GuardedRequest(channel)
    plain.requestHeaders.setRawHeaders(b"host", [b"gw"])
    plain.requestHeaders.setRawHeaders(b"content-length", [b"5"])
    plain.requestHeaders.setRawHeaders(b"expect", [b"100-continue"])
    plain.parseCookies()
    assert rendered_unrefused(plain, channel, limited, b"hello") == [b"hello"]
