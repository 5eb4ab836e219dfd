"""
What people see in a browser: the waiting page and the dashboard.

Both are small self-contained files shipped as package data (no CDN, no build
step), so they work on a machine with no Internet access.  The waiting page is
answered by the proxy to a browser navigation to a cold service; the dashboard
is served by the management API at C{/v1/ui/}.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from hestia.lifecycle import State
from hestia.records import credentials_of

if TYPE_CHECKING:
    from hestia.gateway import Gateway
    from hestia.routing import Route

# The files /v1/ui/<name> may serve, and their content types.  An allow-list:
# nothing else in the package directory is reachable.
ASSETS = {
    "index.html": b"text/html; charset=utf-8",
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
    "waiting.html": b"text/html; charset=utf-8",
}

# The pages run only their own scripts and talk only to this gateway.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def asset(name: str) -> bytes:
    """The bytes of a shipped UI file (raises L{KeyError} for any other name)."""
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__name__).joinpath(name).read_bytes()


def serve_asset(request: Request, name: str) -> bytes:
    """Answer C{request} with the asset C{name}, with safe caching headers."""
    body = asset(name)
    request.setHeader(b"content-type", ASSETS[name])
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    return body


def is_browser_navigation(request: Request) -> bool:
    """
    Whether C{request} is a person's browser loading a page, not an API client.

    A navigation is a C{GET} that accepts C{text/html}, is not marked as an
    XHR (C{X-Requested-With}), and, when the browser says so, has
    C{Sec-Fetch-Mode: navigate}: a C{fetch()} from a page's own script must be
    held and forwarded like any API call, never answered with HTML.
    """
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    if headers.hasHeader(b"x-requested-with"):
        return False
    mode = headers.getRawHeaders(b"sec-fetch-mode")
    if mode and mode[-1].strip().lower() != b"navigate":
        return False
    accept = b",".join(headers.getRawHeaders(b"accept") or []).lower()
    return b"text/html" in accept


def wants_waiting_page(lifecycle: Route, request: Request) -> bool:
    """The waiting page goes to browser navigations to a service not ready, with C{on_cold: page}."""
    return (
        lifecycle.state is not State.READY
        and getattr(lifecycle.config, "on_cold", "page") == "page"
        and is_browser_navigation(request)
    )


def _script_json(data: Any) -> str:
    # Inside <script> only "</" can end the element early; "<\/" is the same JSON.
    return json.dumps(data).replace("</", "<\\/").replace("<!--", "<\\!--")


# The status fields the waiting page reads (waiting.html), all it gets without an admin token.
PUBLIC_STATUS = ("name", "state", "state_reason", "last_error", "last_start_duration")


def waiting_page(lifecycle: Route, now: float, show_output: bool = True) -> bytes:
    """
    The waiting page for C{lifecycle}, with its status embedded.

    @param show_output: whether the last start's output lines may be shown
        (L{hestia.records.Credentials.may_see_output}: they can hold secrets).
    """
    status = lifecycle.status()
    if not show_output:
        # What the page shows and nothing more: a route's status also holds its
        # instances' output, commands and settings, which are for admin tokens.
        status = {key: status.get(key) for key in PUBLIC_STATUS}
    data = {
        "name": lifecycle.name,
        "elapsed": max(0.0, now - lifecycle.state_since),
        "status": status,
        "stream": f"/v1/services/{lifecycle.name}/events/stream",
        "poll": f"/v1/services/{lifecycle.name}/status",
    }
    template = asset("waiting.html").decode("utf-8")
    return template.replace("__HESTIA_DATA__", _script_json(data)).encode("utf-8")


def serve_waiting_page(gateway: Gateway, lifecycle: Route, request: Request) -> None:
    """
    Start C{lifecycle}'s service and answer the navigation with the waiting page.

    The answer is a C{503} with C{Retry-After}: the page is not the resource
    asked for, and no cache or crawler should take it for one.
    """
    if lifecycle.state in (State.STOPPED, State.FAILED):
        # The page request itself starts the service; its outcome shows on the
        # page (via the event stream), so the Deferred's failure is handled there.
        lifecycle.start("request").addErrback(lambda failure: None)
    body = waiting_page(lifecycle, gateway.reactor.seconds(), show_output=credentials_of(request).may_see_output)
    request.setResponseCode(503)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"retry-after", b"2")
    request.setHeader(b"x-hestia-waiting", lifecycle.name.encode("ascii"))
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    request.responseHeaders.removeHeader(b"server")
    request.write(body)
    request.finish()


def openapi_document() -> bytes:
    """
    The OpenAPI contract of C{/v1}.

    Shipped in this package (C{docs/openapi.yaml} is a link to it), so an
    installed Hestia serves the contract of the very code it runs.
    """
    return resources.files(__name__).joinpath("openapi.yaml").read_bytes()
