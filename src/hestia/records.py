"""
Records that pass between layers: what observers (logs, metrics, costs, the
event stream) receive, so that they depend on this module and not on the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass


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
