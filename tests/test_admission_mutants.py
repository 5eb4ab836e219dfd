"""
Per-backend slots (hestia.admission) pinned down further: the rules mutation testing (issue 21)
found unpinned.  A waiter's deadline under a second, cancelling a waiter that has no deadline,
the connect times kept per backend, and the endpoints of a connect attempt (their address, their
timeout, TLS for https), over a Clock / MemoryReactorClock: nothing connects, nothing sleeps.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.client import URI

from hestia.admission import Admission, ConnectRetry
from hestia.errors import QueueTimedOut
from hestia.upstream import AttemptEndpointFactory, ConnectTimes

pytestmark = pytest.mark.unit


def admission(clock: Clock, max_concurrency: int = 1) -> Admission:
    return Admission(clock, max_concurrency, 10, lambda: {"service": "svc", "state": "ready"})


def outcome(deferred: Deferred[Any]) -> list[Any]:
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box


# -- waiting ------------------------------------------------------------------------------


def test_a_deadline_under_a_second_away_is_kept_to_the_millisecond() -> None:
    clock = Clock()
    adm = admission(clock)
    assert adm.try_take()
    waiting = outcome(adm.wait(deadline=clock.seconds() + 0.25))
    clock.advance(0.249)
    assert waiting == []
    clock.advance(0.001)
    assert len(waiting) == 1 and waiting[0].check(QueueTimedOut)
    assert len(adm) == 0


def test_cancelling_a_waiter_without_a_deadline_just_takes_it_out_of_the_queue() -> None:
    clock = Clock()
    adm = admission(clock)
    assert adm.try_take()
    first = adm.wait(deadline=None)
    second = outcome(adm.wait(deadline=None))
    waiting = outcome(first)
    first.cancel()
    assert waiting[0].check(CancelledError)
    assert len(adm) == 1
    adm.release()  # the turn goes to the one still waiting, not to the cancelled one
    assert second == [None] and adm.active == 1


# -- connect times ----------------------------------------------------------------------


def test_connect_times_keep_every_recent_sample_per_backend() -> None:
    times = ConnectTimes()
    times.record(("127.0.0.1", 8080), 0.5)
    times.record(("127.0.0.1", 8080), 0.1)
    times.record(("127.0.0.1", 8081), 0.9)
    assert times.slowest(("127.0.0.1", 8080)) == 0.5
    assert times.slowest(("127.0.0.1", 8081)) == 0.9
    assert times.slowest(("127.0.0.1", 8082)) is None


# -- the endpoints of an attempt ---------------------------------------------------------------


def connect(reactor: MemoryReactorClock, uri: bytes, attempt: int, times: ConnectTimes) -> Deferred[Any]:
    endpoint = AttemptEndpointFactory(reactor, attempt, times).endpointForURI(URI.fromBytes(uri))
    return endpoint.connect(Factory.forProtocol(Protocol))


def complete(reactor: MemoryReactorClock, index: int = -1) -> Protocol:
    """The connect the endpoint asked the reactor for succeeds: what the protocol is."""
    factory = reactor.tcpClients[index][2]
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    return protocol


def test_an_attempt_connects_to_the_backends_address_with_the_rules_timeout() -> None:
    reactor = MemoryReactorClock()
    rule = ConnectRetry()
    connect(reactor, b"http://127.0.0.1:8080/x", 2, ConnectTimes())
    host, port, _factory, timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8080)
    assert timeout == rule.timeout(2)


def test_a_successful_connect_is_timed_and_sets_the_next_first_timeout() -> None:
    reactor = MemoryReactorClock()
    times = ConnectTimes()
    connected = outcome(connect(reactor, b"http://127.0.0.1:8080/", 0, times))
    reactor.advance(0.02)
    complete(reactor)
    assert len(connected) == 1 and isinstance(connected[0], Protocol)
    assert times.slowest(("127.0.0.1", 8080)) == pytest.approx(0.02)
    # The next first attempt waits eight times the slowest connect seen (not the default 0.25 s).
    connect(reactor, b"http://127.0.0.1:8080/", 0, times)
    assert reactor.tcpClients[-1][3] == pytest.approx(0.16)
    assert times.slowest(("127.0.0.1", 9)) is None


def test_an_https_backend_is_connected_to_over_tls() -> None:
    reactor = MemoryReactorClock()
    connected = outcome(connect(reactor, b"https://127.0.0.1:8443/", 0, ConnectTimes()))
    host, port, _factory, _timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8443)
    wire = StringTransport()
    reactor.tcpClients[0][2].buildProtocol(None).makeConnection(wire)
    # The protocol speaks through TLS, and the first bytes on the wire are a TLS handshake record.
    assert len(connected) == 1 and isinstance(connected[0].transport, TLSMemoryBIOProtocol)
    assert wire.value()[:1] == b"\x16"
