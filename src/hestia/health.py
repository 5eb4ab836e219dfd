"""
Readiness probes: is the service answering yet?

A probe is one attempt with its own short timeout; the lifecycle decides how
often to try.  "Not yet" (connection refused, a 503 while a model loads, a
timeout) is C{False}, never an exception: only the backend knows when a
service will never come up.
"""

from __future__ import annotations

from typing import cast
from urllib.parse import urlsplit

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from hestia.config import HealthCheck
from hestia.coroutines import as_deferred

# HostnameEndpoint notices that every address refused only at its next attempt
# tick (attemptDelay, 0.3 s by default), so each probe of a service that is not
# listening yet would take 300 ms, and readiness would be seen that late.
ATTEMPT_DELAY = 0.01


def endpoint_for(reactor: IReactorTime, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A client endpoint to a backend that fails as fast as the network does."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout, attemptDelay=ATTEMPT_DELAY)


def health_url(base_url: str, check: HealthCheck) -> str:
    return base_url.rstrip("/") + (check.path or "/")


@as_deferred
async def probe_http(agent: IAgent, reactor: IReactorTime, url: str, timeout: float) -> bool:
    """C{True} when a GET of C{url} answers 2xx within C{timeout} seconds."""
    request = agent.request(b"GET", url.encode("ascii"), Headers({b"user-agent": [b"hestia-health"]}))
    request.addTimeout(timeout, reactor)
    try:
        response = await request
        # Read (and discard) the body so the pooled connection can be reused.
        body = readBody(response)
        body.addTimeout(timeout, reactor)
        await body
    except CancelledError:
        raise  # the caller gave up (a stop, an abandoned start): not "not up yet"
    except Exception:
        return False
    return 200 <= response.code < 300


@as_deferred
async def probe_tcp(reactor: IReactorTime, url: str, timeout: float) -> bool:
    """C{True} when something accepts a TCP connection at C{url}'s host and port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    endpoint = endpoint_for(reactor, parts.hostname or "localhost", port, timeout)
    try:
        # Factory.forProtocol(Protocol) builds plain Protocols.
        protocol = cast(Protocol, await endpoint.connect(Factory.forProtocol(Protocol)))
    except CancelledError:
        raise
    except Exception:
        return False
    if protocol.transport is not None:
        protocol.transport.loseConnection()
    return True


def probe(agent: IAgent, reactor: IReactorTime, base_url: str, check: HealthCheck) -> Deferred[bool]:
    """One attempt of C{check} against the service at C{base_url}."""
    if check.path:
        return probe_http(agent, reactor, health_url(base_url, check), check.timeout)
    return probe_tcp(reactor, base_url, check.timeout)
