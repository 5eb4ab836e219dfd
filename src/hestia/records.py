"""
Records that pass between layers: what observers (logs, metrics, costs, the
event stream) receive, so that they depend on this module and not on the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary


@dataclass
class RequestRecord:
    """What happened to one proxied request: for the access log and metrics."""

    request_id: str
    service: str
    method: str
    path: str
    client: str
    status: int | None = None
    bytes: int = 0
    began: float = 0.0
    queued: float = 0.0
    upstream: float = 0.0
    duration: float = 0.0
    error: str | None = None
    error_kind: str | None = None
    # The request got its lease (it left the queue for the backend): only
    # then is C{queued} its queue wait and C{queued + upstream} its time to
    # the response headers.
    leased: bool = False
    # Failed connects that were tried again (hestia.admission.ConnectRetry).
    connect_retries: int = 0
    # Seconds from the lease to the first send: the wait for a turn in the
    # backend's admission window (None: never sent).
    slot_wait: float | None = None
    # The name of the token that authorised the request (hestia.auth), if any.
    token_name: str | None = None


@dataclass(frozen=True)
class Denied:
    """Why a request is refused, as the client will be told (L{hestia.auth} decides it)."""

    status: int
    reason: str
    retry_after: float | None = None
    service: str | None = None


@dataclass
class Credentials:
    """
    What authentication found on one request, for the layers that act after it.

    @ivar consumed: the request headers that carried Hestia's own credentials:
        the proxy removes them, so a token never reaches a backend.
    @ivar token_name: the token that authorised the request, if one did.
    @ivar admin: that token grants the management API.
    @ivar may_see_output: the request may be shown a service's own output (an
        error's C{detail}, the waiting page's log lines), which can hold
        secrets: with authentication off, or to an admin token.  C{False}
        until the authenticator has looked.
    @ivar decision: the scope decided last and its refusal (or C{None}),
        decided once per request and scope (the head check and the render
        both ask; a wrong token counts once against the client).
    """

    consumed: frozenset[bytes] = frozenset()
    token_name: str | None = None
    admin: bool = False
    may_see_output: bool = False
    decision: tuple[str, Denied | None] | None = None


# Keyed by the request object and forgotten with it: no attribute is added to Twisted's Request.
_CREDENTIALS: WeakKeyDictionary[object, Credentials] = WeakKeyDictionary()


def credentials_of(request: object) -> Credentials:
    """The L{Credentials} of C{request} (empty until authentication has looked)."""
    found = _CREDENTIALS.get(request)
    if found is None:
        found = _CREDENTIALS[request] = Credentials()
    return found
