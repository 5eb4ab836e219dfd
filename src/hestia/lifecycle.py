"""
The lifecycle state machine of one service instance.

::

    stopped --start--> starting --probe ok--> ready --idle/api--> stopping --> stopped
                          |                     |
                          +--fail/timeout--> failed <--exited--+

All decisions about when to start and stop live here, and nothing else: the
backend (L{hestia.interfaces.IBackend}) does the starting and stopping, the
queue (L{hestia.queue.WaitQueue}) holds requests, and the proxy only calls
L{ServiceLifecycle.acquire} and releases the L{Lease} it gets.  Time comes from
an injected reactor, so every rule here is tested with a
L{twisted.internet.task.Clock}.

Rules that matter to users:
  - one start serves every waiter, however many requests arrive during it;
  - a service is never idle-stopped while a request (or a stream) is in
    flight: the idle clock starts when the last one ends;
  - a service that fails C{CRASH_LOOP_FAILURES} times within
    C{CRASH_LOOP_WINDOW} seconds is left alone for C{COOLDOWN} seconds, and
    requests meanwhile get a 502 at once instead of a restart each.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hestia.config import ServiceConfig
from hestia.errors import (
    GatewayError,
    QueueFull,
    ServiceUnavailable,
    StartFailed,
    StartTimedOut,
    Where,
)
from hestia.interfaces import IBackend, ILease, IReconfigurableBackend, IRoute
from hestia.queue import WaitQueue

if TYPE_CHECKING:
    from hestia.admission import Admission

log = Logger(namespace="hestia.lifecycle")


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True)
class StateChange:
    """
    One transition, as told to observers (logs, metrics, the state store).

    @ivar duration: for C{starting -> ready}, how long the start took; for a
        stop, how long the stop took; else C{None}.
    """

    service: str
    old: State
    new: State
    reason: str
    at: float
    duration: float | None = None
    error: str | None = None


Observer = Callable[[StateChange], None]


def iso_time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@implementer(ILease)
class Lease:
    """
    One request's claim on a ready service.

    While any lease is held the service is "in flight" and is never idle-stopped.
    L{release} is idempotent, so the proxy may call it from every exit path.
    """

    __slots__ = ("_lifecycle", "_released", "fallback", "url")

    def __init__(self, lifecycle: ServiceLifecycle, url: str) -> None:
        self._lifecycle = lifecycle
        self.url = url
        self._released = False
        # Set by a multi-instance route whose strategy retries: a callable
        # that acquires another instance when this one refuses the connection.
        self.fallback: Callable[[], Deferred[Lease]] | None = None

    @property
    def config(self) -> ServiceConfig:
        return self._lifecycle.config

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._lifecycle._lease_released()


class PassiveLease(Lease):
    """
    A monitor's claim on a ready service (issue 17, L{hestia.passive}).

    It is not use: it is not counted in flight and moves no idle clock, so a
    monitor neither keeps a service up nor holds up an exclusive group's swap
    (a stop that comes meanwhile cuts the monitor's request, which is what a
    monitor of a stopping service should see).
    """

    __slots__ = ()

    def release(self) -> None:
        self._released = True


@implementer(IRoute)
class ServiceLifecycle:
    """
    Drives one backend through its states on behalf of the requests for it.
    """

    CRASH_LOOP_FAILURES = 3
    CRASH_LOOP_WINDOW = 60.0
    COOLDOWN = 30.0
    KEEP_WARM_RETRY = 5.0
    # The first probes come quickly, then back off to the health interval:
    # a fast service is seen within milliseconds, a slow one costs little.
    FIRST_PROBE_DELAY = 0.005
    PROBE_GAP_SHARE = 0.005

    def __init__(
        self,
        config: ServiceConfig,
        backend: IBackend,
        reactor: IReactorTime,
        observers: list[Observer] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self._reactor = reactor
        self._observers: list[Observer] = list(observers or [])
        now = reactor.seconds()
        self.state = State.READY if not backend.has_lifecycle else State.STOPPED
        self.state_since = now
        self.state_reason = "configured"
        self.last_error: str | None = None
        self.last_error_detail: list[str] = []
        self.last_request_at: float | None = None
        self.last_start_duration: float | None = None
        self.in_flight = 0
        self.queue = WaitQueue(reactor, config.queue_limit, self._describe)
        self.queue.on_abandoned = self._start_abandoned
        self._start_reason = ""
        self._generation = 0
        self._pending: Deferred[Any] | None = None
        self._start_began = 0.0
        self._start_timer: IDelayedCall | None = None
        self._probe_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._retry_call: IDelayedCall | None = None
        self._start_watchers: list[Deferred[None]] = []
        self._stop_watchers: list[Deferred[None]] = []
        self._cleanup: Deferred[None] | None = None
        self._failures: deque[float] = deque(maxlen=self.CRASH_LOOP_FAILURES)
        self.cooldown_until: float | None = None
        self._shutting_down = False
        # Called with this lifecycle before each launch; the start waits for
        # the Deferred it returns.  Exclusive groups and depends_on (see
        # hestia.groups) use it to stop a rival or start a dependency first.
        self.start_gate: Callable[[ServiceLifecycle], Deferred[Any]] | None = None
        # Issue 17 (hestia.gpu): passed after the start gate, so that GPU memory
        # is reserved only once dependencies run and the exclusive group is ours.
        self.memory_gate: Callable[[ServiceLifecycle], Deferred[Any]] | None = None
        # Told when the last request in flight ends (a GPU device may evict it now),
        # and extra sections of status() (the GPU claim), by name.
        self.idle_observers: list[Callable[[ServiceLifecycle], None]] = []
        self.status_sections: dict[str, Callable[[], Any]] = {}
        # The backend's admission window (hestia.admission), set by the
        # gateway; shown in the status and reconfigured on reload.
        self.admission: Admission | None = None
        # Reload (issue 19, see the section at the end): what the backend was
        # built from, which lags behind config while a restart is pending, and
        # how to build the next one (set by the gateway).
        self.built_from = config
        self.build_backend: Callable[[ServiceConfig], IBackend] | None = None
        self._holding = False  # a restart drains: new requests wait in the queue
        self._drain_waiters: list[Deferred[None]] = []
        self._restart_joiners: list[Deferred[None]] = []
        # Why the service must not be idle-stopped now: a schedule window, a prewarm.
        self.holds: set[str] = set()
        backend.set_exit_handler(self._backend_exited)

    @property
    def name(self) -> str:
        return self.config.name

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    # -- what the proxy and the API call -------------------------------------

    def acquire(self, request: object = None) -> Deferred[Lease]:
        """
        Claim the service for one request, starting it if needed.

        @param request: what is being routed (L{hestia.routing.RouteRequest});
            a single lifecycle has nothing to choose, so it is ignored here.

        @return: a L{Deferred} firing with a L{Lease} once the service is ready,
            or failing with a L{GatewayError}.  Cancel it when the client leaves
            to give up its place in the queue.
        """
        if self.state is State.READY and not self._holding:
            return succeed(self._lease())
        if self._shutting_down:
            return fail(ServiceUnavailable("the gateway is shutting down", **self._describe()))
        if (cooling := self._cooldown_remaining()) > 0:
            return fail(
                StartFailed(
                    f"{self.last_error or 'start failed'} "
                    f"(failed {self.CRASH_LOOP_FAILURES} times in {self.CRASH_LOOP_WINDOW:g}s; "
                    f"not retrying for {cooling:.0f}s)",
                    detail=self.last_error_detail,
                    retry_after=cooling,
                    **self._describe(),
                )
            )
        try:
            waiting = self.queue.wait(self.config.queue_timeout, retry_after=self._retry_after())
        except QueueFull as error:
            return fail(error)
        self._request_start("request")
        return waiting.addCallback(lambda _: self._lease())

    def acquire_passive(self, request: object = None) -> Deferred[Lease] | None:
        """
        A lease for a monitor's request if the service is ready, else C{None}.

        C{None} tells the caller to answer by itself: nothing is started.
        """
        if self.state is not State.READY:
            return None
        return succeed(PassiveLease(self, self.backend.url))

    def start(self, reason: str = "api") -> Deferred[None]:
        """
        Start the service without a request (the API, C{keep_warm}).

        @return: fires once ready; fails with the start's L{GatewayError}.
        """
        if self.state is State.READY:
            return succeed(None)
        if self._shutting_down:
            return fail(ServiceUnavailable("the gateway is shutting down", **self._describe()))
        watcher: Deferred[None] = Deferred()
        self._start_watchers.append(watcher)
        self._request_start(reason)
        return watcher

    def stop(self, reason: str = "api") -> Deferred[None]:
        """
        Stop the service now, whatever is in flight (an explicit stop).

        A start in progress is abandoned and its waiters get a 503.
        """
        if not self.backend.has_lifecycle:
            return succeed(None)
        if self.state is State.STOPPING:
            watcher: Deferred[None] = Deferred()
            self._stop_watchers.append(watcher)
            return watcher
        if self.state is State.STOPPED:
            return succeed(None)
        if self.state is State.FAILED:
            return self._cleanup_done()
        if self.state is State.STARTING:
            self._abandon_start()
            self._fail_waiters(ServiceUnavailable(f"service stopped while starting ({reason})", **self._describe()))
        return self._begin_stop(reason)

    def shutdown(self) -> Deferred[None]:
        """The gateway is stopping: refuse new work, fail waiters, stop."""
        self._shutting_down = True
        for call in (self._idle_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._fail_waiters(ServiceUnavailable("the gateway is shutting down", **self._describe()))
        if getattr(self.backend, "survives_gateway", False) and self.state is not State.STOPPED:
            # A remote machine outlives the gateway: its state is on disk and the
            # next gateway resumes it (hestia.reconcile).  Nothing is stopped and
            # no transition is recorded; the backend just goes quiet.
            self._cancel_start_timer()
            if self._probe_call is not None and self._probe_call.active():
                self._probe_call.cancel()
            self.backend.detach()  # type: ignore[attr-defined]
            return succeed(None)
        return self.stop("shutdown")

    def resume(self, state: State, reason: str, last_request_at: float | None = None) -> None:
        """
        Take up the state a previous gateway recorded (see L{hestia.reconcile}).

        Only a fresh (C{stopped}) lifecycle resumes.  C{ready} keeps the idle
        clock running from C{last_request_at}, so an idle remote machine is
        still torn down; C{starting} starts (the backend follows the task it
        recorded instead of launching another); C{stopping} finishes the stop.
        """
        if self.state is not State.STOPPED or self._shutting_down or not self.backend.has_lifecycle:
            return
        if state is State.READY:
            now = self._reactor.seconds()
            self.last_request_at = last_request_at
            elapsed = max(0.0, now - last_request_at) if last_request_at is not None else 0.0
            self._set_state(State.READY, reason)
            self._arm_idle_timer(max(0.0, self.config.idle_timeout - elapsed))
        elif state is State.STARTING:
            self._begin_start(reason)
        elif state is State.STOPPING:
            self._begin_stop(reason)
        else:
            raise ValueError(f"cannot resume into {state.value}")

    # -- holds (hestia.schedule, hestia.prewarm; issue 16) --------------------------------------

    def hold(self, reason: str) -> None:
        """Keep the service from being idle-stopped until L{release_hold}."""
        self.holds.add(reason)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def release_hold(self, reason: str) -> None:
        """The hold ends: the idle rule applies again, counting from now."""
        if reason in self.holds:
            self.holds.discard(reason)
            if not self.holds and not (self._idle_call is not None and self._idle_call.active()):
                self._arm_idle_timer()

    def lifecycles(self) -> list[ServiceLifecycle]:
        return [self]

    def status(self) -> dict[str, Any]:
        """The service's state as the C{/v1} API shows it."""
        idle_stop_at = None
        if self._idle_call is not None and self._idle_call.active() and self.in_flight == 0:
            idle_stop_at = self._idle_deadline()
        cooldown = self._cooldown_remaining()
        return {
            "name": self.name,
            "state": self.state.value,
            "state_reason": self.state_reason,
            "state_since": iso_time(self.state_since),
            "backend": self.backend.kind,
            "url": self.backend.url,
            "in_flight": self.in_flight,
            "queued": len(self.queue),
            "keep_warm": self.config.keep_warm,
            "held_by": sorted(self.holds),
            "idle_timeout": self.config.idle_timeout,
            "start_timeout": self.config.start_timeout,
            "last_request_at": iso_time(self.last_request_at),
            "idle_stop_at": iso_time(idle_stop_at),
            "last_start_duration": self.last_start_duration,
            "last_error": self.last_error,
            "last_error_detail": self.last_error_detail,
            "cooldown_until": iso_time(self.cooldown_until) if cooldown > 0 else None,
            "details": self.backend.describe(),
            **{name: section() for name, section in self.status_sections.items()},
            "concurrency": self.admission.status() if self.admission is not None else None,
            **self._reload_status(),
        }

    # -- starting --------------------------------------------------------------

    def _request_start(self, reason: str) -> None:
        if self.state in (State.STOPPED, State.FAILED):
            self._begin_start(reason)
        # STARTING: this start serves everyone.  STOPPING: the stop's end
        # starts again, because something is waiting (see _stop_finished).

    def _begin_start(self, reason: str) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._generation += 1
        generation = self._generation
        self._start_reason = reason
        if self._cleanup is None or self._cleanup.called:
            self._take_new_backend()  # before "starting", which log capture attaches on
        self._set_state(State.STARTING, reason)
        self._start_began = self._reactor.seconds()
        if self.config.start_timeout > 0:
            self._start_timer = self._reactor.callLater(
                self.config.start_timeout, self._start_timed_out, generation
            )
        # A failed start's clean-up (the half-started process) must end first.
        cleaned = self._cleanup_done()
        if self.start_gate is None and self.memory_gate is None:
            cleaned.addCallback(lambda _: self._launch(generation))
        else:
            cleaned.addCallback(lambda _: self._pass_gate(generation)).addCallbacks(
                lambda _: self._launch(generation),
                lambda failure: self._start_failed(generation, failure),
            )

    def _pass_gate(self, generation: int) -> Deferred[Any] | None:
        """Wait for the start gate; an abandoned start cancels the wait."""
        if generation != self._generation:
            return None
        gate: Deferred[Any] = self.start_gate(self) if self.start_gate is not None else succeed(None)
        memory_gate = self.memory_gate
        if memory_gate is not None:
            # Cancelling the chain cancels whichever gate it is waiting on.
            gate.addCallback(lambda _: memory_gate(self) if generation == self._generation else None)
        self._pending = gate
        return gate

    def _launch(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._take_new_backend()  # a failed start's clean-up has ended by now
        launching: Deferred[Any] = maybeDeferred(self.backend.start)
        self._pending = launching
        launching.addCallbacks(
            lambda _: self._schedule_probe(generation, 0.0),
            lambda failure: self._start_failed(generation, failure),
        )

    def _schedule_probe(self, generation: int, delay: float) -> None:
        if generation != self._generation:
            return
        self._pending = None
        self._probe_call = self._reactor.callLater(delay, self._probe, generation, delay)

    def _probe(self, generation: int, last_delay: float) -> None:
        self._probe_call = None
        if generation != self._generation:
            return
        # The gap grows with the time the start has taken so far (issue 13):
        # readiness is seen within about 0.5% of the start time, at least
        # FIRST_PROBE_DELAY and at most the health interval.  A doubling gap
        # reached the interval within 15 ms, so a half-second start was seen
        # up to 20 ms late, 10 ms on average; a refused probe costs ~0.1 ms of
        # CPU, so 200 per second for a short start is cheap.
        elapsed = self._reactor.seconds() - self._start_began
        next_delay = min(max(elapsed * self.PROBE_GAP_SHARE, self.FIRST_PROBE_DELAY), self.config.health.interval)
        probing: Deferred[bool] = maybeDeferred(self.backend.probe)
        self._pending = probing
        probing.addCallbacks(
            lambda ready: self._ready(generation) if ready else self._schedule_probe(generation, next_delay),
            lambda failure: self._start_failed(generation, failure),
        )

    def _ready(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._pending = None
        self._cancel_start_timer()
        self.last_start_duration = self._reactor.seconds() - self._start_began
        self.last_error = None
        self.last_error_detail = []
        self._set_state(State.READY, "started", duration=self.last_start_duration)
        self.queue.release_all()
        for watcher in self._take(self._start_watchers):
            watcher.callback(None)
        self._arm_idle_timer()

    def _start_failed(self, generation: int, failure: Failure) -> None:
        if generation != self._generation or failure.check(CancelledError):
            return
        error = failure.value
        if not isinstance(error, GatewayError):
            log.failure("unexpected error starting {service}", failure, service=self.name)
            error = StartFailed(f"start failed: {error}")
        self._give_up_start(error)

    def _start_abandoned(self) -> None:
        """
        The last request waiting for this start went away (issue 17).

        With C{cancel_abandoned_start}, a start that requests asked for (not
        the API, not keep_warm, not a dependant: those wait as start watchers)
        is stopped: nobody would use what it loads.
        """
        if (
            self.config.cancel_abandoned_start
            and self.state is State.STARTING
            and self._start_reason == "request"
            and not self._start_watchers
            and not self.config.keep_warm
            and not self._shutting_down
        ):
            log.info("{service}: every request waiting for the start left: stopping it", service=self.name)
            self.stop("abandoned").addErrback(
                lambda failure: log.failure("stopping {service}", failure, service=self.name)
            )

    def _start_timed_out(self, generation: int) -> None:
        self._start_timer = None
        if generation != self._generation:
            return
        self._give_up_start(StartTimedOut(f"not ready after start_timeout {self.config.start_timeout:g}s"))

    def _give_up_start(self, error: GatewayError) -> None:
        self._abandon_start()
        detail = error.detail or self.backend.recent_output()[-20:]
        now = self._reactor.seconds()
        self._record_failure(now)
        self.last_error = error.reason
        self.last_error_detail = detail
        self._set_state(State.FAILED, "start failed", error=error.reason)
        # The same class of error for every waiter, with this service's facts.
        client_error = type(error)(error.reason, detail=detail, **self._describe())
        self._fail_waiters(client_error)
        # Whatever was half started is cleaned up before any next start.
        self._cleanup = maybeDeferred(self.backend.stop, self.config.stop_timeout).addErrback(
            lambda failure: log.failure("cleaning up {service} after a failed start", failure, service=self.name)
        )
        self._schedule_keep_warm_retry()

    def _abandon_start(self) -> None:
        """Forget the start in progress: later callbacks from it are ignored."""
        self._generation += 1
        self._cancel_start_timer()
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _cancel_start_timer(self) -> None:
        if self._start_timer is not None and self._start_timer.active():
            self._start_timer.cancel()
        self._start_timer = None

    def _fail_waiters(self, error: GatewayError) -> None:
        self.queue.fail_all(error)
        for watcher in self._take(self._start_watchers):
            watcher.errback(error)

    def _record_failure(self, now: float) -> None:
        self._failures.append(now)
        if len(self._failures) == self.CRASH_LOOP_FAILURES and now - self._failures[0] <= self.CRASH_LOOP_WINDOW:
            self.cooldown_until = now + self.COOLDOWN
            self._failures.clear()
            log.warn(
                "{service} failed {count} times in {window:g}s: not restarting it for {cooldown:g}s",
                service=self.name,
                count=self.CRASH_LOOP_FAILURES,
                window=self.CRASH_LOOP_WINDOW,
                cooldown=self.COOLDOWN,
            )

    def _cooldown_remaining(self) -> float:
        if self.cooldown_until is None:
            return 0.0
        return max(0.0, self.cooldown_until - self._reactor.seconds())

    def _schedule_keep_warm_retry(self) -> None:
        if not self.config.keep_warm or self._shutting_down:
            return
        delay = max(self.KEEP_WARM_RETRY, self._cooldown_remaining())
        self._retry_call = self._reactor.callLater(delay, self._keep_warm_retry)

    def _keep_warm_retry(self) -> None:
        self._retry_call = None
        if self.state in (State.FAILED, State.STOPPED) and not self._shutting_down:
            self._begin_start("keep_warm")

    def _retry_after(self) -> float:
        """What a refused client is told to wait: about one start."""
        if self.last_start_duration:
            return max(1.0, self.last_start_duration)
        return 5.0

    # -- requests in flight and idling ------------------------------------------

    def _lease(self) -> Lease:
        # The idle timer stays armed: when it fires it looks at in_flight and
        # last_request_at, which is cheaper than cancelling and scheduling a
        # timer for every request of a busy service.
        self.in_flight += 1
        self.last_request_at = self._reactor.seconds()
        return Lease(self, self.backend.url)

    def _lease_released(self) -> None:
        self.in_flight -= 1
        self.last_request_at = self._reactor.seconds()
        if self.in_flight == 0 and self._drain_waiters:
            for waiter in self._take(self._drain_waiters):
                waiter.callback(None)
        if self.in_flight == 0 and not (self._idle_call is not None and self._idle_call.active()):
            self._arm_idle_timer()
        if self.in_flight == 0:
            for observer in self.idle_observers:
                observer(self)

    def _arm_idle_timer(self, delay: float | None = None) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if (
            self.state is State.READY
            and self.in_flight == 0
            and self.config.idle_timeout > 0
            and not self.config.keep_warm
            and not self.holds
            and self.backend.has_lifecycle
            and not self._shutting_down
        ):
            self._idle_call = self._reactor.callLater(
                self.config.idle_timeout if delay is None else delay, self._idle_expired
            )

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self.state is not State.READY or self.in_flight or len(self.queue) or self._holding:
            return  # The last lease's release arms the timer again.
        remaining = self._idle_deadline() - self._reactor.seconds()
        if remaining > 0:
            # Requests came and went since the timer was set: wait out the rest.
            self._idle_call = self._reactor.callLater(remaining, self._idle_expired)
            return
        self._begin_stop("idle")

    def _idle_deadline(self) -> float:
        """When an idle service is due to stop: idle_timeout after its last request."""
        assert self._idle_call is None or self._idle_call.active()
        last = self.last_request_at
        if last is None:
            # Never used since it was armed (an API start, a resume): the timer's own time.
            return self._idle_call.getTime() if self._idle_call is not None else self._reactor.seconds()
        deadline = last + self.config.idle_timeout
        if self._idle_call is not None:
            deadline = max(deadline, self._idle_call.getTime())
        return deadline

    # -- stopping ----------------------------------------------------------------

    def _begin_stop(self, reason: str) -> Deferred[None]:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        began = self._reactor.seconds()
        self._set_state(State.STOPPING, reason)
        watcher: Deferred[None] = Deferred()
        self._stop_watchers.append(watcher)
        stopping = maybeDeferred(self.backend.stop, self.config.stop_timeout)
        stopping.addCallbacks(
            lambda _: self._stop_finished(reason, began, None),
            lambda failure: self._stop_finished(reason, began, failure),
        )
        return watcher

    def _stop_finished(self, reason: str, began: float, failure: Failure | None) -> None:
        duration = self._reactor.seconds() - began
        if failure is None:
            self._take_new_backend()  # stopped: the next run is the new one
            self._set_state(State.STOPPED, reason, duration=duration)
        else:
            self.last_error = f"stop failed: {failure.getErrorMessage()}"
            # A backend's own stop error carries the command's output apart (admin tokens only).
            self.last_error_detail = failure.value.detail if isinstance(failure.value, GatewayError) else []
            self._set_state(State.FAILED, "stop failed", duration=duration, error=self.last_error)
        for watcher in self._take(self._stop_watchers):
            watcher.callback(None)
        if len(self.queue) and not self._shutting_down:
            # Requests arrived during the stop: they were promised a start
            # (unless a stop watcher, such as a restart, started it already).
            self._request_start("request")

    def _cleanup_done(self) -> Deferred[None]:
        """
        Fires once the last failed start's clean-up has ended.

        A fresh Deferred each time, so that cancelling a caller's chain never
        cancels the clean-up itself.
        """
        cleanup = self._cleanup
        if cleanup is None or cleanup.called:
            self._cleanup = None
            return succeed(None)
        done: Deferred[None] = Deferred()

        def finished(result: object) -> object:
            if self._cleanup is cleanup:
                self._cleanup = None
            done.callback(None)
            return result

        cleanup.addBoth(finished)
        return done

    # -- the backend's own news ----------------------------------------------

    def _backend_exited(self, reason: str, lines: list[str]) -> None:
        """The service ended without being asked to."""
        if self.state is State.STARTING:
            self._give_up_start(StartFailed(f"exited during start: {reason}", detail=lines[-20:]))
        elif self.state is State.READY:
            if self._idle_call is not None and self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
            self._record_failure(self._reactor.seconds())
            self.last_error = f"exited while serving: {reason}"
            self.last_error_detail = lines[-20:]
            self._set_state(State.FAILED, "exited", error=self.last_error)
            self._schedule_keep_warm_retry()

    # -- helpers -------------------------------------------------------------------

    def _describe(self) -> Where:
        return {"service": self.name, "state": self.state.value}

    @staticmethod
    def _take(watchers: list[Deferred[None]]) -> list[Deferred[None]]:
        taken = list(watchers)
        watchers.clear()
        return taken

    def _set_state(
        self, new: State, reason: str, duration: float | None = None, error: str | None = None
    ) -> None:
        old = self.state
        now = self._reactor.seconds()
        self.state = new
        self.state_since = now
        self.state_reason = reason
        event = StateChange(self.name, old, new, reason, now, duration, error)
        log.info(
            "{service}: {old} -> {new} ({reason})",
            service=self.name,
            old=old.value,
            new=new.value,
            reason=reason,
            duration=duration,
            error=error,
            event="state_change",
        )
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                log.failure("observer failed on {service}", service=self.name)

    # -- reload (issue 19): settings in place, restarts when asked -------------------

    @property
    def pending_changes(self) -> tuple[str, ...]:
        """The how-it-runs keys changed since the backend was built (see L{hestia.reload})."""
        if self.built_from is self.config:
            return ()
        from hestia.reload import diff

        return diff(self.built_from, self.config).how_it_runs

    def _reload_status(self) -> dict[str, Any]:
        pending = self.pending_changes
        return {"restart_pending": bool(pending), "pending_changes": list(pending)}

    def reconfigure(self, config: ServiceConfig) -> None:
        """
        Follow a reloaded configuration of this service.

        In-place settings apply at once (the idle clock is re-armed with the new
        C{idle_timeout}, the queue takes the new limit); how it runs waits for the
        next start, when L{build_backend} makes the new backend.
        """
        from hestia.reload import running_settings

        self.built_from = running_settings(self.built_from, config)
        self.config = config
        if not self.pending_changes:
            self.built_from = config
        if IReconfigurableBackend.providedBy(self.backend):
            self.backend.reconfigure(self.built_from)
        self.queue.limit = config.queue_limit
        if self.admission is not None:
            self.admission.configure(config.max_concurrency, config.queue_limit)
        if self.state is State.READY and not self._holding:
            if self._idle_call is not None and self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
            if self.in_flight == 0:
                # The new idle_timeout counts from the last request, as the old one did.
                since = self.last_request_at if self.last_request_at is not None else self.state_since
                self._arm_idle_timer(max(0.0, since + config.idle_timeout - self._reactor.seconds()))
            # else the last lease's release arms it with the new timeout.
        elif self.state is State.STARTING and self._start_timer is not None and self._start_timer.active():
            # A start under way gets the new start_timeout, counted from when it began.
            if config.start_timeout > 0:
                self._start_timer.reset(max(0.0, self._start_began + config.start_timeout - self._reactor.seconds()))
            else:
                self._cancel_start_timer()

    def _take_new_backend(self) -> None:
        """Between two runs: build the backend from the new settings if how it runs changed."""
        pending = self.pending_changes
        if not pending or self.build_backend is None or self._shutting_down:
            return
        backend = self.build_backend(self.config)
        backend.set_exit_handler(self._backend_exited)
        self.backend = backend
        self.built_from = self.config
        log.info("{service}: next run with its new settings ({changes})", service=self.name,
                 changes=", ".join(pending))

    def restart(self, reason: str = "restart") -> Deferred[None]:
        """
        Stop and start again, with the configuration as it is now.

        A ready service is drained first: new requests wait in the queue (they
        are served by the new run), requests in flight finish, for up to
        C{stop_timeout}; then it stops and starts, and the waiting requests go
        to it once it is ready.

        @return: fires once it is ready again; fails as a start fails.
        """
        if self._shutting_down:
            return fail(ServiceUnavailable("the gateway is shutting down", **self._describe()))
        if not self.backend.has_lifecycle:
            return succeed(None)
        if self.state is State.STARTING:
            # Let this start end first; its waiters are served, then restarted gracefully.
            return self.start(reason).addBoth(lambda _: self.restart(reason))
        if self.state is not State.READY:
            return self.stop(reason).addCallback(lambda _: self.start(reason))
        if self._holding:  # a restart is draining already: join it
            joined: Deferred[None] = Deferred()
            self._restart_joiners.append(joined)
            return joined
        self._holding = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

        def drained(_: object) -> Deferred[None]:
            if self._shutting_down:  # the gateway stops it (or it was removed) meanwhile
                return succeed(None)
            if self.state is State.READY:
                return self._begin_stop(reason)
            return self.stop(reason)  # it exited meanwhile: clean up what is left

        def stopped(result: object) -> Deferred[None]:
            return self.start(reason)

        def released(result: object) -> object:
            self._holding = False
            return result

        def tell_joiners(result: object) -> object:
            for joined in self._take(self._restart_joiners):
                if isinstance(result, Failure):
                    joined.errback(result)
                else:
                    joined.callback(None)
            return result

        restarting = self._drain(self.config.stop_timeout).addCallback(drained).addBoth(released)
        return restarting.addCallback(stopped).addBoth(tell_joiners)

    def yield_when_drained(self, reason: str) -> Deferred[None]:
        """
        Issue 17 (hestia.gpu): make room on a GPU without cutting anyone off.

        New requests wait in the queue; those in flight (streams too) finish,
        however long they take; then the service stops, and the requests that
        waited start it again (through its gates) once it has stopped.
        """
        if self.state is not State.READY or self._holding or self._shutting_down:
            return succeed(None)
        self._holding = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        drained: Deferred[None] = succeed(None)
        if self.in_flight:
            drained = Deferred()
            self._drain_waiters.append(drained)

        def stop(_: object) -> Deferred[None] | None:
            self._holding = False
            if self.state is State.READY and not self._shutting_down:
                return self._begin_stop(reason)
            return None

        return drained.addCallback(stop)

    def retire(self, reason: str = "removed") -> Deferred[None]:
        """
        The service left the configuration: stop it once the requests in
        flight have finished (for up to C{stop_timeout}), never to start again.
        """

        def finish(_: object) -> Deferred[None]:
            self._shutting_down = True  # no restart for queued requests, no keep_warm retry
            if self._retry_call is not None and self._retry_call.active():
                self._retry_call.cancel()
            self._fail_waiters(ServiceUnavailable("the service was removed from the configuration",
                                                  **self._describe()))
            return self._begin_stop(reason) if self.state is State.READY else self.stop(reason)

        if not self.backend.has_lifecycle:
            return succeed(None)  # an upstream Hestia never started: nothing to stop
        if self.state is not State.READY:
            return finish(None)
        return self._drain(self.config.stop_timeout).addCallback(finish)

    def start_after(self, previous: Deferred[Any]) -> None:
        """
        Launch nothing before C{previous} fires: the stop of a run of the same
        service that a reload retired, still finishing its requests.  Requests
        meanwhile wait in the queue, as they do during a failed start's clean-up.
        """
        waiting: Deferred[None] = Deferred()
        earlier = self._cleanup_done()

        def previous_done(result: object) -> object:
            earlier.addBoth(lambda _: waiting.callback(None))
            return result

        previous.addBoth(previous_done)
        self._cleanup = waiting

    def _drain(self, timeout: float) -> Deferred[None]:
        """Fires when no request of this service is in flight, or after C{timeout}."""
        if self.in_flight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)

        def give_up() -> None:
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)
                log.info("{service}: {count} requests still in flight after stop_timeout {timeout:g}s",
                         service=self.name, count=self.in_flight, timeout=timeout)
                waiter.callback(None)

        timer = self._reactor.callLater(timeout, give_up)

        def cancel_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(cancel_timer)
