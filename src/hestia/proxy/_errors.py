"""
How the proxy answers a request it cannot forward: Hestia's JSON error, or a cut connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.server import Request

from hestia.errors import (
    GatewayError,
    write_json,
)
from hestia.records import credentials_of

if TYPE_CHECKING:
    pass



def write_error(request: Request, error: GatewayError, request_id: bytes | None = None) -> None:
    """Answer C{request} with C{error} as JSON, unless the client already left."""
    if request.finished or getattr(request, "_disconnected", False):
        return
    if request.startedWriting:
        # Headers are out: the only honest signal left is a cut connection.
        request.loseConnection()
        return
    document = error.to_json()
    if "detail" in document and not credentials_of(request).may_see_output:
        del document["detail"]  # The service's output: admin tokens only, as on the logs route.
    write_json(request, error.status, document, retry_after=error.retry_after, request_id=request_id,
               hide_server=True)
