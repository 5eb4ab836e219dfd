"""
Live state changes as Server-Sent Events, and recent activity for the dashboard.

C{GET /v1/services/<name>/events/stream} answers C{text/event-stream}: first a
C{status} event with the service's current status (so a client never misses
the state it connected in), then one C{state} event per transition, and a
comment line every L{EventHub.HEARTBEAT} seconds, which keeps proxies from
timing the stream out and lets Twisted notice a client that went away.

One L{EventHub} per gateway subscribes once to every lifecycle (through
L{Gateway.add_state_observer}, which also covers services added by a reload)
and fans each change out to the streams open for that service, so an open
stream costs nothing but its socket.  The hub also counts finished proxied
requests per service, which gives the dashboard a request rate without a
metrics stack.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.server import Request

from hestia.lifecycle import StateChange, iso_time
from hestia.records import RequestRecord

if TYPE_CHECKING:
    from hestia.gateway import Gateway

log = Logger(namespace="hestia.events")

Subscriber = Callable[[StateChange], None]


def sse_message(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One SSE message: C{event:}, optional C{id:}, one C{data:} line of JSON."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    # json.dumps never emits a raw newline, so one data line always suffices.
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def change_to_json(change: StateChange) -> dict[str, Any]:
    return {
        "service": change.service,
        "old": change.old.value,
        "new": change.new.value,
        "reason": change.reason,
        "at": iso_time(change.at),
        "duration": change.duration,
        "error": change.error,
    }


class EventHub:
    """
    Fans state changes out to open streams; counts requests per service.

    @cvar HEARTBEAT: seconds between keep-alive comments on an open stream.
    @cvar RATE_WINDOW: the window, in seconds, L{request_rate} averages over.
    """

    HEARTBEAT = 15.0
    RATE_WINDOW = 60.0
    RECENT = 20

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.reactor = gateway.reactor
        self._subscribers: dict[str, list[Subscriber]] = defaultdict(list)
        self._requests: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=10_000))
        self._totals: dict[str, int] = defaultdict(int)
        self.recent: dict[str, deque[dict[str, Any]]] = defaultdict(lambda: deque(maxlen=self.RECENT))
        self._serial = 0
        gateway.add_state_observer(self._changed)
        gateway.request_observers.append(self._request_finished)

    # -- observers ------------------------------------------------------------

    def _changed(self, change: StateChange) -> None:
        self.recent[change.service].append(change_to_json(change))
        for subscriber in list(self._subscribers.get(change.service, ())):
            try:
                subscriber(change)
            except Exception:
                log.failure("event stream subscriber failed")

    def _request_finished(self, record: RequestRecord) -> None:
        name = record.service
        self._requests[name].append(self.reactor.seconds())
        self._totals[name] += 1

    def subscribe(self, name: str, subscriber: Subscriber) -> Callable[[], None]:
        """Call C{subscriber} on each change of C{name}; returns the unsubscriber."""
        self._subscribers[name].append(subscriber)

        def unsubscribe() -> None:
            subscribers = self._subscribers.get(name, [])
            if subscriber in subscribers:
                subscribers.remove(subscriber)
            if not subscribers:
                self._subscribers.pop(name, None)

        return unsubscribe

    def subscriber_count(self, name: str) -> int:
        return len(self._subscribers.get(name, ()))

    # -- activity ---------------------------------------------------------------

    def request_rate(self, name: str) -> float:
        """Requests per second finished over the last L{RATE_WINDOW} seconds."""
        times = self._requests.get(name)
        if not times:
            return 0.0
        horizon = self.reactor.seconds() - self.RATE_WINDOW
        while times and times[0] < horizon:
            times.popleft()
        return round(len(times) / self.RATE_WINDOW, 3)

    def activity(self, name: str) -> dict[str, Any]:
        """What the dashboard shows beyond the lifecycle's own status."""
        return {
            "requests_total": self._totals.get(name, 0),
            "request_rate": self.request_rate(name),
            "recent_events": list(self.recent.get(name, ())),
        }

    # -- the stream -------------------------------------------------------------

    def stream(self, request: Request, name: str) -> Deferred[None]:
        """
        Serve one event stream until the client goes away.

        @return: a L{Deferred} that never fires by itself: Klein cancels it
            when the connection closes, which unsubscribes the stream.
        """
        lifecycle = self.gateway.route(name)  # UnknownService -> 404 first.
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"retry: 2000\n\n" + sse_message("status", lifecycle.status(), self._next_id()))

        def send(change: StateChange) -> None:
            status = self.gateway.services[name].status() if name in self.gateway.services else None
            payload = {**change_to_json(change), "status": status}
            request.write(sse_message("state", payload, self._next_id()))

        heartbeat: list[IDelayedCall] = []

        def beat() -> None:
            request.write(b": keep-alive\n\n")
            heartbeat[:] = [self.reactor.callLater(self.HEARTBEAT, beat)]

        unsubscribe = self.subscribe(name, send)
        heartbeat.append(self.reactor.callLater(self.HEARTBEAT, beat))

        def cancel(deferred: Deferred[None]) -> None:
            unsubscribe()
            for call in heartbeat:
                if call.active():
                    call.cancel()

        done: Deferred[None] = Deferred(cancel)
        return done

    def _next_id(self) -> int:
        self._serial += 1
        return self._serial
