"""
The management API at C{/v1}: an embedded Klein app in the gateway's tree.

Every answer is JSON; every failure is the same C{{"error", "service",
"state"}} shape the proxy uses, with the same status codes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Request

from hestia import __version__
from hestia.coroutines import as_deferred, shielded
from hestia.errors import BadRequest, GatewayError, ServiceUnavailable, UnknownService
from hestia.lifecycle import State
from hestia.state import StateStoreError, StoreClosed

if TYPE_CHECKING:
    from hestia.costs import CostLedger
    from hestia.gateway import Gateway
    from hestia.logs import ServiceOutput
    from hestia.metrics import HestiaMetrics
    from hestia.state import StateStore


def json_body(request: Request, data: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(data, indent=None).encode("utf-8") + b"\n"


def _flag(request: Request, name: bytes) -> bool:
    values = request.args.get(name) or [b""]
    return values[0].lower() in (b"1", b"true", b"yes")


class ManagementAPI:
    """
    Routes of C{/v1}.

    @ivar reload: called by C{POST /v1/reload}; returns a summary or raises
        L{hestia.config.ConfigError} (the running config is then kept).
    """

    app = Klein()

    def __init__(
        self,
        gateway: Gateway,
        reload: Callable[[], dict[str, Any]] | None = None,
        store: StateStore | None = None,
        metrics: HestiaMetrics | None = None,
        output: ServiceOutput | None = None,
        costs: CostLedger | None = None,
    ) -> None:
        """
        @param metrics: served at C{/v1/metrics} (L{hestia.metrics}).
        @param output: each service's recent output, for C{/v1/services/<name>/logs}.
        """
        self.gateway = gateway
        self._reload = reload
        self.store = store
        self.metrics = metrics
        self.output = output
        self.costs = costs
        from hestia.events_stream import EventHub

        self.events_hub = EventHub(gateway)

    def resource(self) -> IResource:
        return self.app.resource()

    @app.handle_errors(GatewayError)  # type: ignore[arg-type]
    def gateway_error(self, request: Request, failure: Failure) -> bytes:
        error: GatewayError = failure.value  # type: ignore[assignment]
        if error.retry_after is not None:
            request.setHeader(b"retry-after", str(max(1, round(error.retry_after))).encode())
        return json_body(request, error.to_json(), error.status)

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        return json_body(request, {"status": "ok", "version": __version__})

    @app.route("/services", methods=["GET"])
    def services(self, request: Request) -> bytes:
        return json_body(
            request,
            {
                "services": [
                    {**lifecycle.status(), **self.events_hub.activity(name), **self._cost_fields(name)}
                    for name, lifecycle in self.gateway.services.items()
                ]
            },
        )

    @app.route("/services/<name>/status", methods=["GET"])
    def status(self, request: Request, name: str) -> bytes:
        return json_body(request, {**self.gateway.route(name).status(), **self.events_hub.activity(name),
                                   **self._cost_fields(name)})

    # -- costs (issue 16, hestia.costs) -------------------------------------------

    def _cost_fields(self, name: str) -> dict[str, Any]:
        return self.costs.status_fields(name) if self.costs is not None else {}

    @app.route("/costs", methods=["GET"])
    @as_deferred
    async def costs_report(self, request: Request) -> Any:
        from hestia.costs import PERIODS

        period = (request.args.get(b"period") or [b"all"])[0].decode("ascii", "replace")
        if period not in PERIODS:
            raise BadRequest(f"period must be one of {', '.join(PERIODS)}")
        if self.costs is None:
            raise UnknownService("costs are not enabled")
        report = await self.costs.report(period)
        return json_body(request, report)

    @app.route("/costs/timeline", methods=["GET"])
    @as_deferred
    async def costs_timeline(self, request: Request) -> Any:
        if self.costs is None:
            raise UnknownService("costs are not enabled")
        timeline = await self.costs.timeline(7.0)
        return json_body(request, timeline)

    @app.route("/services/<name>/events/stream", methods=["GET"])
    def events_stream(self, request: Request, name: str) -> Deferred[None]:
        """State changes as Server-Sent Events (see L{hestia.events_stream})."""
        return self.events_hub.stream(request, name)

    @app.route("/ui", methods=["GET"])
    def ui_redirect(self, request: Request) -> bytes:
        request.redirect(b"/v1/ui/")
        return b""

    @app.route("/ui/", methods=["GET"])
    def ui_index(self, request: Request) -> bytes:
        from hestia.ui import serve_asset

        return serve_asset(request, "index.html")

    @app.route("/ui/<asset>", methods=["GET"])
    def ui_asset(self, request: Request, asset: str) -> bytes:
        from hestia.ui import ASSETS, serve_asset

        if asset not in ASSETS or asset == "waiting.html":
            raise UnknownService("no such file in /v1/ui/")
        return serve_asset(request, asset)

    @app.route("/openapi.yaml", methods=["GET"])
    def openapi(self, request: Request) -> bytes:
        """The contract of every /v1 route (docs/openapi.yaml, shipped in the package)."""
        from hestia.ui import openapi_document

        request.setHeader(b"content-type", b"application/yaml")
        return openapi_document()

    @app.route("/services/<name>/events", methods=["GET"])
    @as_deferred
    async def events(self, request: Request, name: str) -> Any:
        self.gateway.route(name)
        try:
            limit = max(1, min(1000, int((request.args.get(b"limit") or [b"50"])[0])))
        except ValueError:
            limit = 50
        try:
            history = [] if self.store is None else (await self.store.events(name, limit))
        except (StateStoreError, StoreClosed) as error:
            # Locked by another process for longer than the store waits, or shutting down.
            raise ServiceUnavailable(f"the state database cannot be read now: {error}", service=name,
                                     retry_after=5.0) from None
        return json_body(request, {"name": name, "events": history})

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics_route(self, request: Request) -> Any:
        """Prometheus text format, from a plain resource (L{hestia.metrics})."""
        if self.metrics is None:
            raise UnknownService("metrics are not enabled")
        return self.metrics.resource()

    @app.route("/services/<name>/logs", methods=["GET"])
    def logs(self, request: Request, name: str) -> Any:
        """
        The service's last output lines: C{?tail=N} (default 200) as JSON, or
        with C{?follow=true} the tail and then every new line as Server-Sent Events.
        """
        from hestia.logs import OUTPUT_LINES_KEPT, FollowResource, ServiceOutput

        self.gateway.route(name)
        raw = (request.args.get(b"tail") or [b"200"])[0]
        try:
            tail = int(raw)
        except ValueError:
            return json_body(request, {"error": "tail must be a whole number", "service": name,
                                       "state": self.gateway.route(name).state.value}, 400)
        tail = max(0, min(OUTPUT_LINES_KEPT, tail))
        if self.output is None:
            self.output = ServiceOutput(self.gateway)
        if _flag(request, b"follow"):
            return FollowResource(self.output, name, tail)
        return json_body(request, {"name": name, "lines": self.output.tail(name, tail)})

    @app.route("/services/<name>/start", methods=["POST"])
    @as_deferred
    async def start(self, request: Request, name: str) -> Any:
        lifecycle = self.gateway.route(name)
        if lifecycle.state is State.READY:
            return json_body(request, lifecycle.status(), 200)
        starting: Deferred[None] = lifecycle.start("api")
        if _flag(request, b"wait"):
            await starting
            return json_body(request, lifecycle.status(), 200)
        starting.addErrback(lambda failure: None)  # Seen in status and the log.
        return json_body(request, lifecycle.status(), 202)

    @app.route("/services/<name>/stop", methods=["POST"])
    @as_deferred
    async def stop(self, request: Request, name: str) -> Any:
        lifecycle = self.gateway.route(name)
        await lifecycle.stop("api")
        return json_body(request, lifecycle.status(), 200)

    @app.route("/services/<name>/restart", methods=["POST"])
    @as_deferred
    async def restart(self, request: Request, name: str) -> Any:
        """
        Drain, stop and start again with the configuration as it is now (issue 19):
        how a pending C{restart_pending} change is applied.  C{?wait=true} answers
        once it is ready again; otherwise 202 at once.
        """
        self.gateway.route(name)
        restarting: Deferred[None] = self.gateway.restart(name)
        if _flag(request, b"wait"):
            # A client that leaves stops waiting; the restart goes on (or the service stays stopped).
            await shielded(restarting)
            return json_body(request, self.gateway.route(name).status(), 200)
        restarting.addErrback(lambda failure: None)  # Seen in status and the log.
        return json_body(request, self.gateway.route(name).status(), 202)

    @app.route("/reload", methods=["POST"])
    def reload(self, request: Request) -> bytes:
        from hestia.config import ConfigError

        if self._reload is None:
            return json_body(request, {"error": "reload is not available"}, 501)
        try:
            summary = self._reload()
        except ConfigError as error:
            return json_body(request, {"error": str(error), "kept": "the running configuration"}, 400)
        return json_body(request, summary)

    @app.route("/", branch=True)
    def not_found(self, request: Request) -> bytes:
        raise UnknownService("no such route under /v1")
