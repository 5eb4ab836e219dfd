"""
Issue 12, the request path: raw bytes through the daemon's own site, in memory.

Each test is one hole found by attacking a running Hestia (tunnels without a
101, h2c, bodies read before authorisation, bytes the target may not hold,
types Hestia made up, Host, traversal spellings, header counts, chunk sizes,
slow bodies, tokens, process output).  See hestia.testing.site for the harness.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from twisted.logger import globalLogPublisher

from hestia.errors import StartFailed
from hestia.headers import PathEscape, split_service_path
from hestia.testing import ADMIN_TOKEN, ECHO_TOKEN, MemoryHestia, body_of, statuses

pytestmark = pytest.mark.unit

GET = b"GET /services/echo/%s HTTP/1.1\r\nHost: gw\r\n%s\r\n"
UPGRADE = (b"GET /services/echo/socket HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.fixture
def hestia() -> MemoryHestia:
    return MemoryHestia()


@pytest.fixture
def errors_logged() -> Iterator[list[dict[str, object]]]:
    """Every failure or critical event logged while the test runs."""
    found: list[dict[str, object]] = []

    def observe(event: dict[str, object]) -> None:
        if event.get("log_failure") is not None or str(event.get("log_level", "")) in ("critical",):
            found.append(event)
        elif event.get("isError"):
            found.append(event)

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


# -- hole 1: a refused upgrade is a normal response, not a tunnel -----------------------


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\nnot here\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
])
def test_a_refused_upgrade_is_relayed_and_the_next_request_is_parsed(hestia: MemoryHestia, answer: bytes) -> None:
    client = hestia.request(UPGRADE)
    [upgrade] = hestia.upgrades.connections
    assert upgrade.sent().startswith(b"GET /socket HTTP/1.1\r\n")
    upgrade.answer(answer)
    hestia.settle()
    status = int(answer[9:12])
    assert statuses(client.received()) == [status]
    assert not client.taken_over and not client.closed
    assert body_of(client.received()) == body_of(answer)
    # The same connection goes on as HTTP: the next request is parsed, routed
    # and checked, and never reaches the upgrade connection.
    sent_before = upgrade.sent()
    client.send(GET % (b"after", b""))
    assert statuses(client.received()) == [status, 200]
    assert [request.uri for request in hestia.backend.seen] == [b"/after"]
    assert upgrade.sent() == sent_before


def test_a_refused_upgrade_ends_the_request_and_frees_its_lease(hestia: MemoryHestia) -> None:
    hestia.request(UPGRADE)
    hestia.upgrades.connections[0].answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    hestia.settle()
    assert hestia.gateway.in_flight_requests == 0
    assert hestia.gateway.route("echo").in_flight == 0


def test_a_refused_upgrade_does_not_forward_later_bytes_unparsed(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    upgrade = hestia.upgrades.connections[0]
    upgrade.answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    hestia.settle()
    client.send(b"GET /services/echo/../../v1/services HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert statuses(client.received()) == [404, 400]
    assert b"/v1/services" not in upgrade.sent()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nhello",  # 45 bytes short, and then nothing
    b"HTTP/1.1 404 Not Found\r\n\r\nuntil the close",  # a body that ends when the backend closes: never
])
def test_a_refused_upgrade_whose_body_stalls_is_cut_at_response_idle_timeout(answer: bytes) -> None:
    # Found attacking a running Hestia: a plain request's stalled body was cut
    # at response_idle_timeout, but a refused upgrade's relayed body waited
    # for ever (past connection_idle_timeout too), holding the client, the
    # backend connection and the service's in-flight count.
    hestia = MemoryHestia({"echo": {"url": "http://backend:8000", "response_idle_timeout": 5}})
    client = hestia.request(UPGRADE)
    upgrade = hestia.upgrades.connections[0]
    upgrade.answer(answer)
    hestia.settle()
    assert not client.closed
    hestia.advance(4)
    upgrade.answer(b"more")  # A byte resets the period.
    hestia.advance(4)
    assert not client.closed and not upgrade.transport.disconnecting
    hestia.advance(2)
    assert client.closed
    assert upgrade.transport.disconnecting
    assert hestia.gateway.route("echo").in_flight == 0
    assert hestia.gateway.in_flight_requests == 0


def test_a_101_splices_the_connections(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    upgrade = hestia.upgrades.connections[0]
    upgrade.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    hestia.settle()
    assert client.taken_over
    assert client.received().startswith(b"HTTP/1.1 101 ") and client.received().endswith(b"\x81\x02hi")
    client.transport.protocol.dataReceived(b"\x81\x02yo")  # type: ignore[attr-defined]
    assert upgrade.sent().endswith(b"\x81\x02yo")


# -- hole 2: only websocket upgrades --------------------------------------------------------


def test_h2c_is_not_tunnelled_and_its_headers_are_stripped(hestia: MemoryHestia) -> None:
    client = hestia.request(GET % (b"h2c", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"))
    assert hestia.upgrades.connections == []
    assert statuses(client.received()) == [200]
    [seen] = hestia.backend.seen
    for name in (b"upgrade", b"http2-settings"):
        assert not seen.requestHeaders.hasHeader(name), name


def test_http2_settings_is_stripped_even_when_connection_does_not_list_it(hestia: MemoryHestia) -> None:
    hestia.request(GET % (b"x", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"))
    assert not hestia.backend.seen[0].requestHeaders.hasHeader(b"http2-settings")


def test_only_the_websocket_token_of_an_upgrade_is_passed_on(hestia: MemoryHestia) -> None:
    hestia.request(UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c, websocket"))
    [upgrade] = hestia.upgrades.connections
    head = upgrade.sent().lower()
    assert b"\r\nupgrade: websocket\r\n" in head and b"h2c" not in head


# -- hole 3: authorisation before 100 Continue and before the body ------------------------------


@pytest.mark.parametrize("credentials, status", [
    (b"", 401),
    (b"X-Hestia-Token: wrong\r\n", 401),
    (b"Authorization: Bearer " + ECHO_TOKEN.encode() + b"\r\n", 403),
])
@pytest.mark.parametrize("target", [b"/services/other/upload", b"/v1/reload"])
def test_an_unauthorised_body_is_refused_before_100_continue(credentials: bytes, status: int, target: bytes) -> None:
    hestia = MemoryHestia(auth=True)
    client = hestia.request(b"POST " + target + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n"
                            b"Expect: 100-continue\r\n" + credentials + b"\r\n")
    raw = client.received()
    assert statuses(raw) == [status], raw
    assert b"100 Continue" not in raw
    assert client.closed
    assert json.loads(body_of(raw))["error"]
    if status == 401:
        assert b"WWW-Authenticate: Bearer" in raw
    assert hestia.backend.seen == []


@pytest.mark.parametrize(("target", "status"), [
    (b"/services/nosuch/upload", 404),
    (b"/nowhere", 404),
    (b"/", 404),
    (b"/services", 404),
    (b"/services/", 404),
    (b"/v1/health", 401),  # Open without a token, but only to a GET without a body.
])
def test_a_body_to_nowhere_is_refused_before_100_continue(target: bytes, status: int) -> None:
    # Found attacking a running Hestia: a body sent anywhere but a known
    # service or a guarded /v1 route got 100 Continue and was read (spooled to
    # disk, up to max_body_size, 4 GiB by default) before its 404, so a client
    # with no token could fill the disk.
    hestia = MemoryHestia(auth=True)
    method = b"GET" if target == b"/v1/health" else b"POST"
    client = hestia.request(method + b" " + target + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n"
                            b"Expect: 100-continue\r\n\r\n")
    raw = client.received()
    assert statuses(raw) == [status], raw
    assert b"100 Continue" not in raw
    assert client.closed
    assert json.loads(body_of(raw))["error"]
    assert hestia.backend.seen == []


def test_an_unauthorised_chunked_body_is_refused_before_it_is_read() -> None:
    hestia = MemoryHestia(auth=True)
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert statuses(client.received()) == [401] and client.closed


def test_an_authorised_body_gets_100_continue_and_arrives() -> None:
    hestia = MemoryHestia(auth=True)
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n"
                            b"Expect: 100-continue\r\nX-Hestia-Token: " + ECHO_TOKEN.encode() + b"\r\n\r\n")
    assert statuses(client.received()) == [100]
    client.send(b"data")
    assert statuses(client.received()) == [100, 200]
    assert hestia.backend.bodies[0] == b"data"


def test_a_wrong_token_counts_once_however_many_checks_see_it() -> None:
    hestia = MemoryHestia(auth=True)
    hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nX-Hestia-Token: bad\r\n\r\n")
    assert len(hestia.authenticator._recent("10.0.0.7")) == 1


# -- hole 8: bytes the target may not hold --------------------------------------------------------


@pytest.mark.parametrize("target", [b"/services/echo/\x7f", b"/services/echo/\x80x", b"/services/echo/caf\xc3\xa9",
                                    b"/services/echo/x?q=\xff", b"/v1/services/\xfe/status", b"/\x9f"])
def test_high_bytes_in_the_target_are_a_json_400(hestia: MemoryHestia, target: bytes,
                                                 errors_logged: list[dict[str, object]]) -> None:
    client = hestia.request(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    raw = client.received()
    assert statuses(raw) == [400], raw
    assert b"Content-Type: application/json" in raw
    assert json.loads(body_of(raw))["error"]
    assert hestia.backend.seen == []
    assert errors_logged == []


# -- hole 9: no made-up Content-Type -----------------------------------------------------------------


def test_an_untyped_response_goes_out_untyped(hestia: MemoryHestia) -> None:
    raw = hestia.request(GET % (b"x?notype=1", b"")).received()
    assert statuses(raw) == [200]
    assert b"content-type" not in raw.split(b"\r\n\r\n")[0].lower()


def test_a_typed_response_keeps_its_type(hestia: MemoryHestia) -> None:
    raw = hestia.request(GET % (b"x", b"")).received()
    assert b"Content-Type: application/json" in raw


def test_an_untyped_refused_upgrade_goes_out_untyped(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    hestia.upgrades.connections[0].answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    hestia.settle()
    assert b"content-type" not in client.received().split(b"\r\n\r\n")[0].lower()


# -- Host -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [b"Host: gw\r\nHost: other", b"Host: gw, other", b"Host: g w", b"Host: gw:80x",
                                  b"Host: user@gw", b"Host: [::1", b"Host: gw/x", b"Host: gw:99999999999",
                                  b"X-No-Host: 1"])
def test_duplicate_and_malformed_hosts_are_400(hestia: MemoryHestia, host: bytes) -> None:
    client = hestia.request(b"GET /services/echo/x HTTP/1.1\r\n" + host + b"\r\n\r\n")
    assert statuses(client.received()) == [400], client.received()
    assert hestia.backend.seen == []


@pytest.mark.parametrize("host", [b"gw", b"gw.example.org:8080", b"127.0.0.1:8080", b"[::1]:8080", b"[fe80::1]",
                                  b"xn--bcher-kva.example", b"GW.Example.", b""])
def test_well_formed_hosts_are_served(hestia: MemoryHestia, host: bytes) -> None:
    client = hestia.request(b"GET /services/echo/x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert statuses(client.received()) == [200], client.received()


def test_an_http_1_0_request_needs_no_host(hestia: MemoryHestia) -> None:
    assert statuses(hestia.request(b"GET /services/echo/x HTTP/1.0\r\n\r\n").received()) == [200]


# -- traversal, however it is encoded ---------------------------------------------------------------------


@pytest.mark.parametrize("rest", [
    b"/..;/v1", b"/..;x=1/other", b"/%2e%2e;/v1", b"/.%2e;jsessionid=1/x",
    b"/%c0%ae%c0%ae/v1", b"/%C0%AE%C0%AE/v1", b"/%e0%80%ae%e0%80%ae/x", b"/%f0%80%80%ae%f0%80%80%ae/x",
    b"/..%c0%afv1", b"/%c0%ae%c0%ae%c0%afv1",
    b"/%ef%bc%8e%ef%bc%8e/v1", b"/\xef\xbc\x8e\xef\xbc\x8e/v1", b"/%ef%bc%8e./v1",
    b"/..%ef%bc%8fv1", b"/..%ef%bc%bcv1",
    b"/%u002e%u002e/v1", b"/%U002E%u002e/x",
    b"/%e2%80%a4%e2%80%a4/x", b"/%25c0%25ae%25c0%25ae/x", b"/..%20/x", b"/..%00/x", b"/%e2%80%a5/x",
])
def test_every_spelling_of_dot_dot_is_refused(rest: bytes) -> None:
    with pytest.raises(PathEscape):
        split_service_path(b"/services/echo" + rest)


@pytest.mark.parametrize("rest", [b"/a..b", b"/..a/x", b"/.hidden", b"/%ef%bc%8e/x", b"/a;b=..c", b"/x?y=../z",
                                  b"/caf%c3%a9", b"/%e2%80%a4/x", b"/v1.2/..x"])
def test_names_that_only_look_like_dot_dot_pass(rest: bytes) -> None:
    assert split_service_path(b"/services/echo" + rest) == ("echo", rest)


# -- header count, chunk sizes, slow bodies -------------------------------------------------------------------


def test_ten_thousand_headers_are_431(hestia: MemoryHestia) -> None:
    many = b"".join(b"X-%d: v\r\n" % n for n in range(10_000))
    client = hestia.request(b"GET /services/echo/x HTTP/1.1\r\nHost: gw\r\n" + many + b"\r\n")
    assert statuses(client.received()) == [431] and client.closed


@pytest.mark.parametrize("size_line", [b"f" * 20, b"1" + b"0" * 16, b"ffffffffffffffff", b"0" * 30 + b"ffffffffffffffffff"])
def test_an_absurd_chunk_size_is_400_at_once(hestia: MemoryHestia, size_line: bytes) -> None:
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + size_line + b"\r\nabc")
    assert statuses(client.received()) == [400], client.received()
    assert client.closed and hestia.backend.seen == []


def test_a_chunk_larger_than_max_body_size_is_413_at_once() -> None:
    hestia = MemoryHestia(server={"max_body_size": "1m"})
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"200000\r\nabc")
    assert statuses(client.received()) == [413] and client.closed


def test_a_long_chunk_size_with_leading_zeros_is_still_a_size() -> None:
    hestia = MemoryHestia()
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"0003\r\nabc\r\n0\r\n\r\n")
    assert statuses(client.received()) == [200]


def test_a_body_that_trickles_in_is_cut_at_its_read_deadline() -> None:
    hestia = MemoryHestia(server={"body_timeout": 20, "body_min_rate": 500})
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\nabc")
    for _ in range(5):  # a byte every 5 s: the idle timer (60 s) never fires
        hestia.reactor.advance(5)
        client.send(b"x")
    assert statuses(client.received()) == [408] and client.closed
    assert hestia.backend.seen == []


def test_a_body_at_a_fair_rate_is_not_cut() -> None:
    hestia = MemoryHestia(server={"body_timeout": 20, "body_min_rate": 500})
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(50):  # 2,000 bytes a second for 50 s: more than the minimum rate
        hestia.reactor.advance(1)
        client.send(b"y" * 2000)
    assert statuses(client.received()) == [200]
    assert len(hestia.backend.bodies[0]) == 100000


def test_the_body_deadline_ends_with_the_body() -> None:
    hestia = MemoryHestia(server={"body_timeout": 20, "body_min_rate": 500})
    client = hestia.request(b"POST /services/echo/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc")
    hestia.reactor.advance(30)
    assert statuses(client.received()) == [200] and not client.closed


# -- tokens and what a token may see -------------------------------------------------------------------------------


def test_an_empty_hestia_token_does_not_hide_a_bearer_token() -> None:
    hestia = MemoryHestia(auth=True)
    raw = hestia.request(GET % (b"x", b"X-Hestia-Token: \r\nAuthorization: Bearer " + ECHO_TOKEN.encode()
                                + b"\r\n")).received()
    assert statuses(raw) == [200], raw


def _failed_start(token: str) -> dict[str, object]:
    hestia = MemoryHestia({"echo": {"url": "http://backend:8000", "command": ["x"]}}, auth=True)
    client = hestia.request(GET % (b"x", b"X-Hestia-Token: " + token.encode() + b"\r\n"))
    fake = hestia.fakes["echo"]
    fake.output = ["token=s3cr3t http://127.0.0.1:8888/?token=abc"]
    fake.starts[0].errback(StartFailed("exited during start: exit status 1"))
    hestia.settle()
    assert statuses(client.received()) == [502]
    return json.loads(body_of(client.received()))  # type: ignore[no-any-return]


def test_process_output_is_not_shown_to_a_service_scoped_token() -> None:
    assert "detail" not in _failed_start(ECHO_TOKEN)
    assert "s3cr3t" not in json.dumps(_failed_start(ECHO_TOKEN))


def test_process_output_is_shown_to_an_admin_token() -> None:
    assert _failed_start(ADMIN_TOKEN)["detail"] == ["token=s3cr3t http://127.0.0.1:8888/?token=abc"]


# -- hole 3 over HTTP/2 ------------------------------------------------------------------------------------------


class H2Client:
    """An HTTP/2 client (the h2 library) on an in-memory connection that negotiated h2 by ALPN."""

    def __init__(self, hestia: MemoryHestia) -> None:
        import h2.config
        import h2.connection

        self.hestia = hestia
        self.client = hestia.connect_with(negotiated=b"h2")
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.events: list[object] = []
        self._seen = 0
        self.flush()

    def flush(self) -> None:
        self.client.send(self.h2.data_to_send())
        data = self.client.received()[self._seen:]
        self._seen += len(data)
        self.events.extend(self.h2.receive_data(data))
        if self.h2.data_to_send():
            self.client.send(self.h2.data_to_send())

    def statuses(self) -> list[int]:
        import h2.events

        found = []
        for event in self.events:
            if isinstance(event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
                found.append(int(dict(event.headers)[b":status"]))
        return found


@pytest.mark.parametrize("credentials, status", [([], 401), ([(b"x-hestia-token", b"wrong")], 401),
                                                 ([(b"x-hestia-token", ECHO_TOKEN.encode())], 403)])
def test_an_unauthorised_http2_body_gets_no_100_continue_and_is_not_stored(
        credentials: list[tuple[bytes, bytes]], status: int) -> None:
    hestia = MemoryHestia(auth=True)
    client = H2Client(hestia)
    client.h2.send_headers(1, [(b":method", b"POST"), (b":path", b"/services/other/upload"), (b":scheme", b"https"),
                               (b":authority", b"gw"), (b"content-length", b"6"), (b"expect", b"100-continue"),
                               *credentials])
    client.flush()
    assert client.statuses() == []  # no 100 Continue
    client.h2.send_data(1, b"secret", end_stream=True)
    client.flush()
    assert client.statuses() == [status]
    assert hestia.backend.seen == []


def test_an_authorised_http2_body_gets_100_continue_and_arrives() -> None:
    hestia = MemoryHestia(auth=True)
    client = H2Client(hestia)
    client.h2.send_headers(1, [(b":method", b"POST"), (b":path", b"/services/echo/upload"), (b":scheme", b"https"),
                               (b":authority", b"gw"), (b"content-length", b"4"), (b"expect", b"100-continue"),
                               (b"x-hestia-token", ECHO_TOKEN.encode())])
    client.flush()
    assert client.statuses() == [100]
    client.h2.send_data(1, b"data", end_stream=True)
    client.flush()
    assert client.statuses() == [100, 200]
    assert hestia.backend.bodies == [b"data"]


def _waiting_page_after_a_failed_start(token: str) -> bytes:
    hestia = MemoryHestia({"echo": {"url": "http://backend:8000", "command": ["x"]}}, auth=True)
    fake_client = hestia.request(GET % (b"x", b"X-Hestia-Token: " + ADMIN_TOKEN.encode() + b"\r\n"))
    fake = hestia.fakes["echo"]
    fake.output = ["token=s3cr3t"]
    fake.starts[0].errback(StartFailed("exited during start: exit status 1"))
    hestia.settle()
    assert statuses(fake_client.received()) == [502]
    page = hestia.request(GET % (b"", b"Accept: text/html\r\nX-Hestia-Token: " + token.encode() + b"\r\n"))
    assert statuses(page.received()) == [503] and b"x-hestia-waiting" in page.received().lower()
    return page.received()


def test_the_waiting_page_shows_process_output_to_admins_only() -> None:
    assert b"s3cr3t" not in _waiting_page_after_a_failed_start(ECHO_TOKEN)
    assert b"s3cr3t" in _waiting_page_after_a_failed_start(ADMIN_TOKEN)


@pytest.mark.parametrize("hosts, status", [([(b":authority", b"g w")], 400), ([(b":authority", b"a@b")], 400),
                                           ([(b":authority", b"gw"), (b"host", b"gw")], 200),
                                           ([(b":authority", b"gw:8443")], 200)])
def test_an_http2_stream_gets_the_host_checks(hosts: list[tuple[bytes, bytes]], status: int) -> None:
    hestia = MemoryHestia()
    client = H2Client(hestia)
    client.h2.send_headers(1, [(b":method", b"GET"), (b":path", b"/services/echo/x"), (b":scheme", b"https"), *hosts],
                           end_stream=True)
    client.flush()
    assert client.statuses() == [status]
    assert len(hestia.backend.seen) == (status == 200)


def test_no_100_continue_for_a_refused_request_even_without_a_body() -> None:
    hestia = MemoryHestia(auth=True)
    raw = hestia.request(GET % (b"x", b"Expect: 100-continue\r\n")).received()
    assert statuses(raw) == [401], raw


# -- the upgrade connection's other endings ------------------------------------------------------------------


def test_an_upgrade_backend_that_closes_without_an_answer_is_a_502(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    hestia.upgrades.connections[0].close()
    hestia.settle()
    raw = client.received()
    assert statuses(raw) == [502] and json.loads(body_of(raw))["error"].startswith("backend closed")
    assert not client.taken_over and hestia.gateway.in_flight_requests == 0


def test_a_101_to_another_protocol_is_a_502(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    upgrade = hestia.upgrades.connections[0]
    upgrade.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
    hestia.settle()
    assert statuses(client.received()) == [502] and not client.taken_over
    assert upgrade.transport.disconnecting


def test_a_refused_upgrade_whose_body_breaks_off_cuts_the_client(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    upgrade = hestia.upgrades.connections[0]
    upgrade.answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\npartial")
    upgrade.close()
    hestia.settle()
    assert statuses(client.received()) == [404] and client.closed
    assert hestia.gateway.in_flight_requests == 0


def test_a_body_that_runs_to_the_close_is_relayed_whole(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    upgrade = hestia.upgrades.connections[0]
    upgrade.answer(b"HTTP/1.1 403 Forbidden\r\n\r\nno websockets here")
    upgrade.close()
    hestia.settle()
    assert statuses(client.received()) == [403] and body_of(client.received()) == b"no websockets here"


def test_a_client_that_leaves_before_the_answer_drops_the_upgrade_connection(hestia: MemoryHestia) -> None:
    client = hestia.request(UPGRADE)
    upgrade = hestia.upgrades.connections[0]
    client.transport.loseConnection()
    hestia.settle()
    assert upgrade.transport.disconnecting
    assert hestia.gateway.in_flight_requests == 0 and hestia.gateway.route("echo").in_flight == 0
    upgrade.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert not client.taken_over


def test_an_http2_body_that_trickles_in_is_reset_at_its_read_deadline() -> None:
    import h2.events

    hestia = MemoryHestia(server={"body_timeout": 20, "body_min_rate": 500})
    client = H2Client(hestia)
    client.h2.send_headers(1, [(b":method", b"POST"), (b":path", b"/services/echo/x"), (b":scheme", b"https"),
                               (b":authority", b"gw"), (b"content-length", b"100000")])
    client.flush()
    def reset() -> bool:
        return any(isinstance(event, h2.events.StreamReset) for event in client.events)

    sent = 0
    while not reset() and sent < 10:  # a byte every 5 s
        hestia.advance(5)
        if not reset():
            client.h2.send_data(1, b"x")
            client.flush()
            sent += 1
    assert reset() and 3 <= sent <= 5, (sent, client.events)
    assert hestia.backend.seen == []


def test_an_http2_body_at_a_fair_rate_arrives() -> None:
    hestia = MemoryHestia(server={"body_timeout": 20, "body_min_rate": 500})
    client = H2Client(hestia)
    client.h2.send_headers(1, [(b":method", b"POST"), (b":path", b"/services/echo/x"), (b":scheme", b"https"),
                               (b":authority", b"gw"), (b"content-length", b"30000")])
    client.flush()
    for index in range(30):  # 1,000 bytes a second for 30 s
        hestia.advance(1)
        client.h2.send_data(1, b"y" * 1000, end_stream=index == 29)
        client.flush()
    assert client.statuses() == [200]
    assert hestia.backend.bodies == [b"y" * 30000]
