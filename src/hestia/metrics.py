"""
Prometheus metrics at C{GET /v1/metrics}.

Hestia keeps a L{CollectorRegistry} of its own, so that what C{/v1/metrics}
shows is exactly the gateway's metrics (no process-wide default registry,
nothing another library registered), and tests can build as many gateways as
they like.

Two kinds of metric, fed two ways:
  - counts and histograms of things that I{happened} (requests, starts,
    stops, upstream errors) are updated by the gateway's request and state
    observers as each happens;
  - gauges of what I{is} (service state, requests in flight, requests queued)
    are read from the gateway when Prometheus scrapes, by L{GatewayCollector}.
    A gauge kept up to date by increments could drift on a missed edge (a
    reload, a cancelled request); one read at scrape time is always exact.

The resource is a plain, synchronous L{Resource} calling
L{generate_latest}: collecting is cheap and happens on the reactor thread, so
there is nothing to gain from C{prometheus_client.twisted}'s thread pool and
a race to lose.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from hestia.lifecycle import State, StateChange
from hestia.records import RequestRecord

if TYPE_CHECKING:
    from hestia.gateway import Gateway

# Why a service stopped.  The label is kept to exactly these values so that
# dashboards can rely on them: an explicit stop by an operator (the API, or a
# reload that changed the service) is "api"; a service that died while
# serving is "failure"; "exclusive" is a stop to make room in an exclusive
# group.
STOP_REASONS = ("idle", "api", "shutdown", "failure", "exclusive")
_STOP_REASON_OF = {"idle": "idle", "api": "api", "reload": "api", "shutdown": "shutdown", "exclusive": "exclusive"}

# How a start ended: ready, failed (exited, timed out, refused), or given up
# because the service was stopped while it started.
START_RESULTS = ("success", "failure", "cancelled")

# Upstream error kinds (RequestRecord.error_kind) that count as upstream
# errors.  Gateway refusals (queue full, start failed) are not the upstream's
# doing, and a client leaving is nobody's fault.
UPSTREAM_ERROR_KINDS = frozenset({"connect", "upstream", "truncated"})

# Methods are a label: anything a client invents is folded into "other" so
# that it cannot blow up the number of series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})

# No status: the client went away before any was sent (nginx's convention).
CLIENT_CLOSED = 499

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_START_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class GatewayCollector(Collector):
    """The gauges of what is: read from the gateway at each scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "hestia_requests_in_flight",
            "Proxied requests being forwarded to or streamed from the service.",
            labels=["service"],
        )
        queued = GaugeMetricFamily(
            "hestia_requests_queued",
            "Requests held in the service's queue while it starts.",
            labels=["service"],
        )
        state = GaugeMetricFamily(
            "hestia_service_state",
            "1 for the state the service is in, 0 for the others.",
            labels=["service", "state"],
        )
        for name, lifecycle in sorted(self.gateway.services.items()):
            in_flight.add_metric([name], lifecycle.in_flight)
            queued.add_metric([name], len(lifecycle.queue))
            for each in State:
                state.add_metric([name, each.value], 1.0 if lifecycle.state is each else 0.0)
        yield in_flight
        yield queued
        yield state

    def describe(self) -> Iterator[Metric]:
        # Names only (for the registry's duplicate check), without touching
        # the gateway.
        yield GaugeMetricFamily("hestia_requests_in_flight", "", labels=["service"])
        yield GaugeMetricFamily("hestia_requests_queued", "", labels=["service"])
        yield GaugeMetricFamily("hestia_service_state", "", labels=["service", "state"])


class HestiaMetrics:
    """
    Hestia's registry and the observers that feed it.

    Use: C{gateway.request_observers.append(metrics.request_finished)} and
    C{gateway.add_state_observer(metrics.state_changed)}; serve
    L{resource}.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "hestia_requests_total",
            "Proxied requests, by service, method and response status (499: the client left first).",
            ["service", "method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "hestia_request_duration_seconds",
            "Time from a proxied request's arrival to its response headers, queueing included.",
            ["service"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "hestia_queue_wait_seconds",
            "Time a forwarded request waited for its service to be ready (0 when it was).",
            ["service"],
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self.starts = Counter(
            "hestia_service_starts_total",
            "Service starts, by how they ended: success, failure or cancelled.",
            ["service", "result"],
            registry=registry,
        )
        self.start_duration = Histogram(
            "hestia_service_start_duration_seconds",
            "Time from the start of a service to its first passing health check.",
            ["service"],
            buckets=_START_BUCKETS,
            registry=registry,
        )
        self.stops = Counter(
            "hestia_service_stops_total",
            "Services leaving service, by reason: idle, api, shutdown, failure or exclusive.",
            ["service", "reason"],
            registry=registry,
        )
        self.slot_wait = Histogram(
            "hestia_slot_wait_seconds",
            "Time a ready request waited for a turn in its backend's admission window (slow start, max_concurrency).",
            ["service"],
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self.connect_retries = Counter(
            "hestia_connect_retries_total",
            "Connects to a backend that failed (refused or timed out) and were tried again.",
            ["service"],
            registry=registry,
        )
        self.response_timeouts = Counter(
            "hestia_response_timeouts_total",
            "Requests answered 504 because the backend sent no response head within response_timeout.",
            ["service"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "hestia_upstream_errors_total",
            "Proxied requests the upstream failed: connect, upstream (reset or bad reply) or truncated.",
            ["service", "kind"],
            registry=registry,
        )
        registry.register(GatewayCollector(gateway))
        self._known: set[str] = set()
        # Labelled children by label values: labels() validates and looks up
        # under a lock on every call, which the per-request observer would
        # pay for three or four times per request.  The label sets are small
        # (services x methods x statuses), so the caches stay small too.
        # Whatever removes series (remove(), clear()) must empty these too.
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._per_service: dict[str, tuple[Any, Any, Any]] = {}
        self.sync_services()

    def sync_services(self) -> None:
        """
        Create the zero-valued series of every configured service.

        A counter that does not exist yet is not a counter at zero to
        Prometheus: C{rate()} and C{increase()} miss its first increment.
        """
        for name in self.gateway.services:
            if name in self._known:
                continue
            self._known.add(name)
            for result in START_RESULTS:
                self.starts.labels(name, result)
            for reason in STOP_REASONS:
                self.stops.labels(name, reason)
            self.start_duration.labels(name)
            self.queue_wait.labels(name)
            self.request_duration.labels(name)
            self.slot_wait.labels(name)
            self.connect_retries.labels(name)
            self.response_timeouts.labels(name)

    # -- observers ------------------------------------------------------------

    def request_finished(self, record: RequestRecord) -> None:
        """A request observer: count one finished proxied request."""
        service = record.service
        method = record.method if record.method in KNOWN_METHODS else "other"
        status = record.status if record.status is not None else CLIENT_CLOSED
        key = (service, method, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(service, method, str(status))
        counter.inc()
        histograms = self._per_service.get(service)
        if histograms is None:
            histograms = self._per_service[service] = (
                self.request_duration.labels(service),
                self.queue_wait.labels(service),
                self.slot_wait.labels(service),
            )
        if record.status is not None:
            # The upstream answered: its headers came after the queue wait
            # plus the upstream's own time.  Otherwise the gateway's error
            # was the answer, written as the request ended.
            answered = record.leased and record.error_kind not in ("connect", "upstream", "response_timeout")
            to_headers = record.queued + record.upstream if answered else record.duration
            histograms[0].observe(to_headers)
        if record.leased:
            histograms[1].observe(record.queued)
        if record.slot_wait is not None:
            histograms[2].observe(record.slot_wait)
        if record.connect_retries:
            self.connect_retries.labels(service).inc(record.connect_retries)
        if record.error_kind == "response_timeout":
            self.response_timeouts.labels(service).inc()
        if record.error_kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(record.service, record.error_kind).inc()

    def state_changed(self, change: StateChange) -> None:
        """A state observer: count starts and stops."""
        self.sync_services()
        old, new = change.old, change.new
        if old is State.STARTING:
            if new is State.READY:
                self.starts.labels(change.service, "success").inc()
                if change.duration is not None:
                    self.start_duration.labels(change.service).observe(change.duration)
            elif new is State.FAILED:
                self.starts.labels(change.service, "failure").inc()
            elif new is State.STOPPING:
                self.starts.labels(change.service, "cancelled").inc()
        if new is State.STOPPING and old is State.READY:
            self.stops.labels(change.service, _STOP_REASON_OF.get(change.reason, "api")).inc()
        elif new is State.FAILED and old is State.READY:
            self.stops.labels(change.service, "failure").inc()

    # -- exposition -----------------------------------------------------------

    def render(self) -> bytes:
        self.sync_services()
        return generate_latest(self.registry)

    def resource(self) -> MetricsResource:
        return MetricsResource(self)


class MetricsResource(Resource):
    """C{GET /v1/metrics}: the Prometheus text format, rendered synchronously."""

    isLeaf = True

    def __init__(self, metrics: HestiaMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        body = self.metrics.render()
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)
