"""
Logs: JSON lines for machines, an access log, and each service's own output.

Three parts, all on top of L{twisted.logger}:

  - L{JSONLinesObserver}: an L{ILogObserver} writing one JSON object per line
    (C{time}, C{level}, C{event}, C{namespace}, C{message}, then the event's
    own fields), which is what C{docker compose logs}, journald and Loki
    want.  Twisted's own C{jsonFileLogObserver} writes record-separated
    serialised events meant to be read back by Twisted, not by people's log
    pipelines, hence this one.  C{server.log_format: json} (or
    C{--log-format json}) installs it as twistd's log observer: see
    L{install_log_observer}.
  - L{access_log}: a request observer emitting one structured C{request}
    event per proxied request, with its C{request_id} (the C{X-Request-ID}
    also sent to the backend and returned to the client), timings and size.
  - L{ServiceOutput}: the last lines each service wrote, kept per service
    with a sequence number so that C{GET /v1/services/<name>/logs} can show a
    tail and L{FollowResource} can stream new lines as Server-Sent Events.
    (Each line also goes to the log under C{hestia.service.<name>}; the
    process backend does that.)
"""

from __future__ import annotations

import json
import sys
import weakref
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from hestia.lifecycle import StateChange
from hestia.records import RequestRecord

if TYPE_CHECKING:
    from hestia.gateway import Gateway

access = Logger(namespace="hestia.access")

# Keys of Twisted's own bookkeeping, and of legacy (twisted.python.log)
# events, that are either shown another way or meaningless in a log line.
_SKIPPED = frozenset({"format", "isError", "system", "why", "failure", "message", "time", "printed"})
_BASE = ("time", "level", "event", "namespace", "message")


def iso_timestamp(seconds: float) -> str:
    """UTC, milliseconds, C{Z}: what log shippers parse without configuration."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """C{value} as JSON can carry it: scalars as they are, anything else as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value  # An enum such as hestia.lifecycle.State.
    return str(value)


def event_as_json(event: dict[str, Any]) -> str:
    """
    One log event as one line of JSON (without the newline).

    C{event} is the event's name given as C{event=...} to the logger (for
    example C{request}, C{state_change}, C{service_output}), else C{log}.
    """
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": iso_timestamp(event.get("log_time") or 0.0),
        "level": str(getattr(level, "name", "info")),
        "event": str(event.get("event") or "log"),
        "namespace": event.get("log_namespace") or "log",
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIPPED or key in out:
            continue
        out[key] = _plain(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["error"] = failure.getErrorMessage()
        out["traceback"] = failure.getTraceback()
        if out["level"] in ("debug", "info"):
            out["level"] = "error"
    elif event.get("isError") and out["level"] in ("debug", "info"):
        out["level"] = "error"  # A legacy log.err without a failure.
    return json.dumps(out, ensure_ascii=False, default=str)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON line to C{stream} (stdout by default), flushed."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = event_as_json(event)
        except Exception as error:  # Never lose a line for a field that will not serialise.
            line = json.dumps({
                "time": iso_timestamp(event.get("log_time") or 0.0),
                "level": "error",
                "event": "log_encoding_error",
                "namespace": "hestia.logs",
                "message": f"cannot encode a log event: {error!r}",
                "original": repr(event.get("log_format")),
            })
        self._stream.write(line + "\n")
        self._stream.flush()


def install_log_observer(service: IService, parent: Any, log_format: str) -> None:
    """
    Make twistd log through L{JSONLinesObserver} when C{log_format} is json.

    twistd creates the application, adds the plugin's service to it, and
    only then starts logging, with the application's L{ILogObserver}
    component when it has one (the mechanism twistd documents for C{.tac}
    files).  Called from the service's C{setServiceParent}, this sets that
    component; with C{text}, twistd keeps its own observer.
    """
    if log_format != "json" or not isinstance(parent, Componentized):
        return
    if parent.getComponent(ILogObserver, None) is None:
        parent.setComponent(ILogObserver, JSONLinesObserver())


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def access_log(record: RequestRecord) -> None:
    """
    A request observer: one C{request} event per finished proxied request.

    A request that never got its lease (refused, or failed while held) spent
    its whole life waiting for one, so its C{queued_ms} is its duration and
    it has no C{upstream_ms}.
    """
    queued = record.queued if record.leased else record.duration
    answered = record.leased and record.error_kind not in ("connect", "upstream")
    upstream = _ms(record.upstream) if answered else None
    failed = record.status is None or record.status >= 500 or record.error is not None
    emit = access.warn if failed else access.info
    duration_ms = _ms(record.duration)
    # One line per request is the hottest log event there is: the text is
    # rendered here with an f-string, which costs a fraction of what
    # string.Formatter (Twisted's formatEvent) costs for six fields.  The
    # "{log_text}" format is Twisted's own convention for pre-rendered text
    # (twisted.logger._legacy); the fields stay in the event for JSON logs.
    emit(
        "{log_text}",
        log_text=f"{record.method} {record.path} -> {record.status} in {duration_ms}ms "
        f"({record.service}, request {record.request_id})",
        event="request",
        request_id=record.request_id,
        service=record.service,
        method=record.method,
        path=record.path,
        status=record.status,
        duration_ms=duration_ms,
        queued_ms=_ms(queued),
        upstream_ms=upstream,
        bytes=record.bytes,
        client=record.client,
        error=record.error,
        error_kind=record.error_kind,
    )


# -- each service's output ------------------------------------------------------

OUTPUT_LINES_KEPT = 1000

Entry = dict[str, Any]
Follower = Callable[[Entry], None]


class OutputBuffer:
    """
    The last lines one service wrote, each with a sequence number.

    The numbers keep rising across restarts, so that a follower reconnecting
    with C{Last-Event-ID} gets exactly the lines it missed that are still kept.
    """

    def __init__(self, service: str, size: int = OUTPUT_LINES_KEPT) -> None:
        self.service = service
        self.lines: deque[Entry] = deque(maxlen=size)
        self._seq = 0
        self._followers: list[Follower] = []

    def append(self, stream: str, line: str, at: float) -> None:
        self._seq += 1
        entry = {"seq": self._seq, "time": iso_timestamp(at), "stream": stream, "line": line}
        self.lines.append(entry)
        for follower in list(self._followers):
            try:
                follower(entry)
            except Exception:
                access.failure("output follower of {service} failed", service=self.service)
                self.unfollow(follower)

    def tail(self, count: int, after: int = 0) -> list[Entry]:
        """The last C{count} lines, only those numbered above C{after}."""
        if count <= 0:
            return []
        return [entry for entry in list(self.lines)[-count:] if entry["seq"] > after]

    def follow(self, follower: Follower) -> None:
        self._followers.append(follower)

    def unfollow(self, follower: Follower) -> None:
        if follower in self._followers:
            self._followers.remove(follower)

    @property
    def followers(self) -> int:
        return len(self._followers)


class ServiceOutput:
    """
    Every service's L{OutputBuffer}, fed by its backend's line listener.

    Backends are built per service and anew on a reload; L{state_changed}
    (a state observer) attaches to whichever backend a service has when it
    changes state, which is always before its process is spawned, since
    C{starting} is entered before the backend's C{start}.
    """

    def __init__(self, gateway: Gateway, size: int = OUTPUT_LINES_KEPT) -> None:
        self.gateway = gateway
        self.size = size
        self.buffers: dict[str, OutputBuffer] = {}
        self._attached: weakref.WeakSet[Any] = weakref.WeakSet()

    def buffer(self, name: str) -> OutputBuffer:
        if name not in self.buffers:
            self.buffers[name] = OutputBuffer(name, self.size)
        return self.buffers[name]

    def attach_all(self) -> None:
        for name in list(self.gateway.services):
            self.attach(name)

    def attach(self, name: str) -> bool:
        """Listen to C{name}'s backend; C{False} when it cannot be listened to."""
        lifecycle = self.gateway.services.get(name)
        if lifecycle is None:
            return False
        backend = lifecycle.backend
        add_listener = getattr(backend, "add_line_listener", None)
        if add_listener is None:
            return False
        if backend in self._attached:
            return True
        buffer = self.buffer(name)
        reactor = self.gateway.reactor
        add_listener(lambda stream, line: buffer.append(stream, line, reactor.seconds()))
        self._attached.add(backend)
        return True

    def state_changed(self, change: StateChange) -> None:
        self.attach(change.service)

    def tail(self, name: str, count: int, after: int = 0) -> list[Entry]:
        """
        The last C{count} lines of C{name}.

        A backend without a line listener (a container, say) still has its
        C{recent_output()}; those lines come without time or stream.
        """
        if self.attach(name):
            return self.buffer(name).tail(count, after)
        lines = self.gateway.route(name).backend.recent_output()[-count:] if count > 0 else []
        return [{"seq": None, "time": None, "stream": "output", "line": line} for line in lines]


def sse_event(entry: Entry) -> bytes:
    """One Server-Sent Event: the line's number as its id, the entry as JSON data."""
    head = b"" if entry.get("seq") is None else b"id: %d\n" % entry["seq"]
    return head + b"event: line\ndata: " + json.dumps(entry).encode("utf-8") + b"\n\n"


class FollowResource(Resource):
    """
    C{?follow=true}: the tail, then each new line as it is written (SSE).

    Comment lines keep idle connections open through proxies; the follower
    is removed the moment the client goes away.
    """

    isLeaf = True
    KEEPALIVE = 15.0

    def __init__(self, output: ServiceOutput, name: str, count: int) -> None:
        super().__init__()
        self.output = output
        self.name = name
        self.count = count

    def render_GET(self, request: Request) -> int:
        after = 0
        last = request.getHeader(b"last-event-id")
        if last is not None and last.strip().isdigit():
            after = int(last)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b": following " + self.name.encode("ascii") + b"\n\n")
        count = self.count if after == 0 else self.output.size
        for entry in self.output.tail(self.name, count, after):
            request.write(sse_event(entry))
        buffer = self.output.buffer(self.name)

        def send(entry: Entry) -> None:
            request.write(sse_event(entry))

        keepalive = LoopingCall(lambda: request.write(b": keepalive\n\n"))
        keepalive.clock = self.output.gateway.reactor
        keepalive.start(self.KEEPALIVE, now=False)
        buffer.follow(send)

        def gone(result: object) -> None:
            buffer.unfollow(send)
            if keepalive.running:
                keepalive.stop()

        request.notifyFinish().addBoth(gone)
        return NOT_DONE_YET

