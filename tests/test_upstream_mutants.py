"""
hestia.upstream in memory (a MemoryReactorClock, StringTransports for the backend connections):
the rules mutation testing (issue 21) found unpinned.  The gateway's own HTTP client (its
connect timeouts, its keep-alive pool, its retry of a request a reused connection lost, the
connection headers it keeps), the TLS of an https backend, the per-attempt clients, an
upgrade's own connection, the admission windows a gateway's services get, and close().
"""

from __future__ import annotations

from typing import Any

import pytest
from test_admission import HeldBackend
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import readBody
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hestia.admission import CONNECT_RETRY
from hestia.config import ServerConfig
from hestia.testing import MemoryGateway
from hestia.upstream import UPGRADE_CONNECT_TIMEOUT, Upstream

pytestmark = pytest.mark.unit

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Connection(StringTransport):
    """A backend connection in memory: what the client wrote, and its protocol (to answer with)."""

    protocol: Any
    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 -- Twisted's name
        self.no_delay = enabled

    def abortConnection(self) -> None:  # noqa: N802 -- Twisted's name
        self.loseConnection()


def connect(reactor: MemoryReactorClock, index: int = -1) -> Connection:
    """Complete connect attempt C{index} (an in-memory backend connection)."""
    factory = reactor.tcpClients[index][2]
    transport = Connection()
    transport.protocol = factory.buildProtocol(None)
    transport.protocol.makeConnection(transport)
    return transport


def outcome(deferred: Any) -> Any:
    box: list[Any] = []
    deferred.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def own(**server: Any) -> tuple[MemoryReactorClock, Upstream]:
    reactor = MemoryReactorClock()
    return reactor, Upstream(reactor, ServerConfig(**server))


def answered(reactor: MemoryReactorClock, upstream: Upstream, url: bytes, response: bytes = OK,
             agent: IAgent | None = None) -> tuple[Connection, Any]:
    """One GET through C{agent} (the upstream's own by default) on a new connection, answered."""
    pending = (agent or upstream.agent).request(b"GET", url)
    transport = connect(reactor)
    transport.protocol.dataReceived(response)
    response_ = outcome(pending)
    assert outcome(readBody(response_)) == b"ok"
    return transport, response_


# -- the gateway's own client ----------------------------------------------------------------


def test_the_own_client_connects_with_a_5s_timeout_and_keeps_the_connection_for_the_next_request() -> None:
    reactor, upstream = own()
    transport, _ = answered(reactor, upstream, b"http://10.0.0.7:8123/first")
    [(host, port, _, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("10.0.0.7", 8123, 5.0)
    assert transport.value() == b"GET /first HTTP/1.1\r\nHost: 10.0.0.7:8123\r\n\r\n"
    transport.clear()
    second = upstream.agent.request(b"GET", b"http://10.0.0.7:8123/second")
    assert len(reactor.tcpClients) == 1  # the idle connection is reused, not a new one opened
    assert transport.value() == b"GET /second HTTP/1.1\r\nHost: 10.0.0.7:8123\r\n\r\n"
    transport.protocol.dataReceived(OK)
    assert outcome(second).code == 200


def test_the_own_client_keeps_at_most_max_backend_connections_idle_per_backend() -> None:
    reactor, upstream = own(max_backend_connections=1)
    pending = [upstream.agent.request(b"GET", b"http://10.0.0.7:8123/" + name) for name in (b"a", b"b")]
    first, second = connect(reactor, 0), connect(reactor, 1)
    for transport, request in zip((first, second), pending):
        transport.protocol.dataReceived(OK)
        assert outcome(readBody(outcome(request))) == b"ok"
    assert first.disconnecting and not second.disconnecting  # one idle connection kept, the other closed


def test_a_request_a_reused_connection_loses_unanswered_is_sent_again_on_a_new_one() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    reactor, upstream = own()
    transport, _ = answered(reactor, upstream, b"http://10.0.0.7:8123/first")
    again = upstream.agent.request(b"GET", b"http://10.0.0.7:8123/again")
    transport.protocol.connectionLost(Failure(ConnectionDone()))  # the backend had closed it meanwhile
    assert len(reactor.tcpClients) == 2
    fresh = connect(reactor)
    assert fresh.value().startswith(b"GET /again HTTP/1.1\r\n")
    fresh.protocol.dataReceived(OK)
    assert outcome(again).code == 200


def test_the_own_client_keeps_the_connection_headers_of_a_response_for_the_proxy() -> None:
    reactor, upstream = own()
    _, response = answered(reactor, upstream, b"http://10.0.0.7:8123/x",
                           b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 2\r\n\r\nok")
    assert response.connection_headers.getRawHeaders(b"connection") == [b"x-secret"]


def test_an_https_backend_gets_tls_naming_its_host_on_its_port() -> None:
    reactor, upstream = own()
    upstream.agent.request(b"GET", b"https://backend.example:8443/x")
    assert reactor.tcpClients[-1][1] == 8443
    hello = connect(reactor).value()
    assert hello[:1] == b"\x16" and b"backend.example" in hello  # a TLS ClientHello with the name (SNI)


def test_close_closes_the_idle_backend_connections() -> None:
    reactor, upstream = own()
    transport, _ = answered(reactor, upstream, b"http://10.0.0.7:8123/x")
    assert not transport.disconnecting
    upstream.close()
    assert transport.disconnecting


def test_close_without_a_pool_of_its_own_is_done_at_once() -> None:
    @implementer(IAgent)
    class Agent:
        def request(self, *args: Any) -> Any:
            raise AssertionError("not used")

    agent = Agent()
    upstream = Upstream(MemoryReactorClock(), ServerConfig(), agent=agent)
    assert outcome(upstream.close()) is None
    assert upstream.agent_for_attempt(0) is agent and upstream.agent_for_attempt(7) is agent


# -- one client per connect attempt ------------------------------------------------------------


def test_each_connect_attempt_has_its_timeout_and_they_share_the_pool() -> None:
    reactor, upstream = own()
    first = upstream.agent_for_attempt(0)
    assert upstream.agent_for_attempt(0) is first  # one client per attempt number
    transport, _ = answered(reactor, upstream, b"http://10.0.0.8:81/a", agent=first)
    assert reactor.tcpClients[0][3] == CONNECT_RETRY.timeout(0)
    transport.clear()
    upstream.agent_for_attempt(1).request(b"GET", b"http://10.0.0.8:81/b")
    assert len(reactor.tcpClients) == 1  # attempt 1 reuses attempt 0's idle connection: one pool
    assert transport.value().startswith(b"GET /b HTTP/1.1\r\n")


@pytest.mark.parametrize(("attempt", "rule"), [(3, 3), (12, 12), (40, 12)])
def test_a_later_attempt_waits_longer_up_to_attempt_12s_timeout(attempt: int, rule: int) -> None:
    reactor, upstream = own()
    upstream.agent_for_attempt(attempt).request(b"GET", b"http://10.0.0.8:81/a")
    [(host, port, _, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("10.0.0.8", 81, CONNECT_RETRY.timeout(rule))


def test_an_attempts_timeout_follows_the_backends_recent_connect_times() -> None:
    reactor, upstream = own()
    upstream.agent_for_attempt(0).request(b"GET", b"http://10.0.0.8:81/a")
    reactor.advance(0.01)  # the connect took 10 ms
    connect(reactor)
    upstream.agent_for_attempt(2).request(b"GET", b"http://10.0.0.8:81/b")
    assert reactor.tcpClients[-1][3] == CONNECT_RETRY.timeout(2, 0.01) < CONNECT_RETRY.timeout(2)


def test_an_attempt_to_an_https_backend_gets_tls_naming_its_host() -> None:
    reactor, upstream = own()
    upstream.agent_for_attempt(0).request(b"GET", b"https://backend.example:8443/x")
    assert reactor.tcpClients[-1][1] == 8443
    hello = connect(reactor).value()
    assert hello[:1] == b"\x16" and b"backend.example" in hello


# -- an upgrade's own connection ----------------------------------------------------------------


@pytest.mark.parametrize(("url", "port"), [
    ("http://backend.example", 80),
    ("http://backend.example:8081/base", 8081),
    ("https://backend.example", 443),
])
def test_an_upgrade_connects_to_the_backends_port_with_a_10s_timeout(url: str, port: int) -> None:
    # (A MemoryReactorClock resolves every name to 127.0.0.1: the host shows in TLS's SNI, below.)
    from twisted.internet.protocol import Factory, Protocol

    reactor, upstream = own()
    upstream.upgrade_endpoint(url).connect(Factory.forProtocol(Protocol))
    reactor.advance(0)
    [(_, connected_port, _, timeout, _)] = reactor.tcpClients
    assert (connected_port, timeout) == (port, UPGRADE_CONNECT_TIMEOUT) and timeout == 10.0


def test_an_upgrade_to_an_https_backend_gets_tls_naming_its_host() -> None:
    from twisted.internet.protocol import Factory, Protocol

    reactor, upstream = own()
    upstream.upgrade_endpoint("https://backend.example").connect(Factory.forProtocol(Protocol))
    reactor.advance(0)
    assert reactor.tcpClients[-1][1] == 443
    hello = connect(reactor).value()
    assert hello[:1] == b"\x16" and b"backend.example" in hello and b"localhost" not in hello


# -- the admission windows of a gateway's services ----------------------------------------------


def test_a_services_window_is_capped_by_max_backend_connections() -> None:
    harness = MemoryGateway({"svc": {"url": "http://127.0.0.1:9", "max_concurrency": 8}},
                            server={"max_backend_connections": 2}, backend=HeldBackend())
    answers = [harness.get(f"/services/svc/{number}") for number in range(3)]
    harness.settle()
    assert len(harness.backend.held) == 2  # type: ignore[attr-defined]
    assert harness.status("svc")["concurrency"]["max_concurrency"] == 2
    assert harness.status("svc")["concurrency"]["waiting"] == 1
    harness.backend.finish(3)  # type: ignore[attr-defined]
    harness.settle()
    harness.backend.finish(3)  # type: ignore[attr-defined]
    assert all(harness.result(answer).code == 200 for answer in answers)


def test_a_full_window_queue_is_a_503_naming_the_service_and_its_state() -> None:
    harness = MemoryGateway({"svc": {"url": "http://127.0.0.1:9", "max_concurrency": 1, "queue_limit": 1}},
                            backend=HeldBackend())
    held = [harness.get(f"/services/svc/{number}") for number in range(2)]
    harness.settle()
    refused = harness.result(harness.get("/services/svc/third"))
    assert refused.code == 503
    body = harness.json(refused)
    assert (body["service"], body["state"]) == ("svc", "ready")
    assert len(held) == 2


def test_a_backend_whose_url_is_known_once_it_runs_gets_its_window_when_ready() -> None:
    harness = MemoryGateway({"svc": {"url": "http://127.0.0.1:9", "command": ["serve"], "max_concurrency": 3}},
                            backend=HeldBackend())
    assert harness.status("svc")["concurrency"]["max_concurrency"] == 3  # a window from the start
    harness.fakes["svc"].url = "http://127.0.0.1:4242"  # e.g. a container's published port
    first = harness.get("/services/svc/x")
    harness.start("svc")
    harness.settle()
    # The window the status shows is the one the requests to the new URL take turns in.
    assert harness.status("svc")["concurrency"]["active"] == 1
    harness.backend.finish(1)  # type: ignore[attr-defined]
    assert harness.result(first).code == 200
    assert harness.status("svc")["concurrency"]["active"] == 0
