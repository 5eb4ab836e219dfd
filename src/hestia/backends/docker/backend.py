"""
The C{docker} backend: a container on a Docker-API engine (Docker or Podman).

::

    services:
      jellyfin:
        url: http://127.0.0.1:8096
        health: {path: /health}
        docker:
          container: jellyfin                 # name or id; default: the service name
          host: unix:///var/run/docker.sock   # default: $DOCKER_HOST, else this socket
          stop_mode: stop                     # or pause
          group: [jellyfin-db]                # started before it, stopped after it
          adopt: true                         # found running at start-up: ready, idle-stopped

Why it is built the way it is:

  - Never ready too early (Sablier's most reported fault): ready means the
    container runs, its own Docker healthcheck (when it has one) says
    C{healthy}, I{and} the service's health probe passes.  The probe runs
    first, because it is the cheap and usual "not yet"; the engine is asked
    only when it fails (to notice an exit) or when a healthcheck must agree.
  - A container that exits on its own, while starting or serving, is reported
    to the lifecycle with its exit code and the last lines of its log.  The
    engine's C{/events} stream tells us at once (Podman reports a stop as
    C{die} then C{cleanup}, without Docker's C{stop}); during a start the
    probe's C{inspect} is a second witness.  The stream is subscribed before
    the container is started, so a container that dies at once is not missed,
    and it is re-subscribed with backoff (and the container inspected again)
    when the engine restarts under us: containers outlive their engine's API.
  - Engine failures (no socket, permission denied, an engine error) become
    L{StartFailed} with the engine client's own sentence: the status API and
    the 502 body say what to fix, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IAgent
from zope.interface import implementer, provider

from hestia import health
from hestia.backends.docker.engine import (
    ContainerEngineError,
    DockerEngine,
    EngineError,
    EventStream,
    NoSuchContainer,
    parse_engine_host,
)
from hestia.backends.docker.reconnect import Reconnect
from hestia.backends.docker.settings import DockerSettings, settings_of
from hestia.config import ConfigError, ServiceConfig
from hestia.errors import StartFailed
from hestia.interfaces import IAdoptableBackend, IBackendFactory, IReconfigurableBackend

if TYPE_CHECKING:
    pass

T = TypeVar("T")

LOG_LINES_KEPT = 20
# Re-subscribing to a restarted engine: quickly at first, then every 10 s at most.
# Actions after which the container is no longer running (Podman: die, cleanup).
_GONE_ACTIONS = {"die", "oom", "destroy", "remove"}


_ENGINES: dict[tuple[int, str], DockerEngine] = {}


def shared_engine(reactor: IReactorTime, host: str | None) -> DockerEngine:
    """
    One client (one connection pool) per engine address and reactor.

    A home lab has many containers on one engine; each needs only a few calls.
    """
    address = parse_engine_host(host).url
    key = (id(reactor), address)
    if key not in _ENGINES:
        engine = _ENGINES[key] = DockerEngine(address, reactor=reactor)
        # Negotiating the API version costs Podman most of a second (GET
        # /version): do it now rather than during the first cold start.
        engine.version().addErrback(lambda failure: None)
    return _ENGINES[key]


def describe_exit(state: Mapping[str, Any]) -> str:
    """C{exit code 3} (plus the engine's error or C{OOM-killed} when it says so)."""
    text = f"exit code {state.get('ExitCode', '?')}"
    if state.get("OOMKilled"):
        text += " (OOM-killed)"
    if error := state.get("Error"):
        text += f" ({error})"
    return text


def _running(state: Mapping[str, Any]) -> bool:
    return bool(state.get("Running")) and not state.get("Paused")


@implementer(IAdoptableBackend, IReconfigurableBackend)
class DockerBackend:
    """Starts, stops (or pauses) and watches one container, plus its group."""

    kind = "docker"
    has_lifecycle = True

    def __init__(
        self, service: ServiceConfig, reactor: IReactorTime, agent: IAgent, engine: DockerEngine | None = None
    ) -> None:
        self.service = service
        self.settings = settings_of(service)
        self.url = service.url
        self._reactor = reactor
        self._agent = agent
        self.engine = engine or shared_engine(reactor, self.settings.host)
        self._log = Logger(namespace=f"hestia.service.{service.name}")
        self._exit_handler: Callable[[str, list[str]], None] = lambda reason, lines: None
        self._container_id: str | None = None
        self._has_healthcheck = False
        # Exits are news only between a start and a stop (ours).
        self._watching = False
        self._stream: EventStream | None = None
        self._reconnect = Reconnect(reactor, lambda: self._run(self._resubscribe()))
        self.output: list[str] = []
        self._last_exit: str | None = None
        self._container_state: str | None = None
        self._health_status: str | None = None
        self._engine_error: str | None = None
        # Whether a start reached the engine: if not, a stop has nothing to undo.
        self._launched = False

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coroutine)

    # -- IBackend ----------------------------------------------------------------

    def set_exit_handler(self, handler: Callable[[str, list[str]], None]) -> None:
        self._exit_handler = handler

    def start(self) -> Deferred[None]:
        return self._run(self._start())

    async def _start(self) -> None:
        self._watching = True
        self._reconnect.succeeded()
        self._launched = True
        try:
            for member in self.settings.group:
                await self._wake(member)
            info = await self.engine.inspect(self.settings.container)
            self._remember(info)
            # Subscribe before starting: an immediate exit must not be missed.
            await self._subscribe()
            await self._wake(self.settings.container, info)
            self._container_state = "running"
        except ContainerEngineError as error:
            self._watching = False
            # Unreachable: nothing was started, so the clean-up stop has nothing to do.
            self._launched = isinstance(error, EngineError)
            self._engine_error = str(error) if not isinstance(error, NoSuchContainer) else None
            raise StartFailed(str(error)) from None
        self._engine_error = None

    async def _wake(self, container: str, info: dict[str, Any] | None = None) -> None:
        """Run C{container}: unpause it if paused, start it if not running."""
        if info is None:
            info = await self.engine.inspect(container)
        state = info.get("State") or {}
        if state.get("Paused"):
            await self.engine.unpause(container)
            self._log.info("unpaused container {container}", container=self._shown(container),
                           service=self.service.name)
        elif not state.get("Running"):
            await self.engine.start(container)
            self._log.info("started container {container}", container=self._shown(container),
                           service=self.service.name)

    def probe(self) -> Deferred[bool]:
        return self._run(self._probe())

    async def _probe(self) -> bool:
        answering = await health.probe(self._agent, self._reactor, self.url, self.service.health)
        if answering and not self._has_healthcheck:
            return True
        # Not answering yet (has it died?), or its healthcheck must agree.
        try:
            info = await self.engine.inspect(self._container_ref)
        except ContainerEngineError as error:
            self._engine_error = str(error)
            raise StartFailed(str(error)) from None
        self._remember(info)
        state = info.get("State") or {}
        if not state.get("Running"):
            reason = describe_exit(state)
            await self._fetch_logs()
            self._gone(reason)
            raise StartFailed(f"exited during start: {reason}", detail=list(self.output))
        if self._has_healthcheck and self._health_status != "healthy":
            return False
        return answering and not state.get("Paused")

    def stop(self, timeout: float) -> Deferred[None]:
        return self._run(self._stop(timeout))

    async def _stop(self, timeout: float) -> None:
        self._watching = False
        self._reconnect.cancel()
        await self._unsubscribe()
        if not self._launched:
            return
        try:
            await self._put_down(self._container_ref, timeout)
            for member in reversed(self.settings.group):
                await self._put_down(member, timeout)
            self._launched = False
        except ContainerEngineError as error:
            self._engine_error = str(error)
            raise

    async def _put_down(self, container: str, timeout: float) -> None:
        """Stop or pause C{container} if it runs; a missing one is stopped enough."""
        try:
            info = await self.engine.inspect(container)
        except NoSuchContainer:
            return
        state = info.get("State") or {}
        main = container == self._container_ref
        if main:
            self._remember(info)
        if not _running(state):
            return
        if self.settings.stop_mode == "pause":
            await self.engine.pause(container)
            done = "paused"
        else:
            await self.engine.stop(container, timeout=max(0, round(timeout)))
            done = "exited"
        if main:
            self._container_state = done
        self._log.info("{done} container {container}", done="paused" if done == "paused" else "stopped",
                       container=self._shown(container), service=self.service.name)

    def reconfigure(self, service: ServiceConfig) -> None:
        # IReconfigurableBackend: a reload's in-place settings (the health check).
        self.service = service

    def describe(self) -> dict[str, Any]:
        return {
            "container": self.settings.shown_as or self.settings.container,
            "container_id": self._container_id[:12] if self._container_id else None,
            "container_state": self._container_state,
            "health": self._health_status,
            "engine": self.engine.address.url,
            "stop_mode": self.settings.stop_mode,
            "group": list(self.settings.group),
            "last_exit": self._last_exit,
            "engine_error": self._engine_error,
        }

    def recent_output(self) -> list[str]:
        return list(self.output)

    # -- IAdoptableBackend ----------------------------------------------------------

    def running_already(self) -> Deferred[bool]:
        return self._run(self._running_already())

    async def _running_already(self) -> bool:
        if not self.settings.adopt:
            return False
        try:
            info = await self.engine.inspect(self.settings.container)
        except ContainerEngineError as error:
            self._engine_error = str(error)
            self._log.warn("cannot check whether {container} runs: {error}",
                           container=self._shown(self.settings.container), error=str(error), service=self.service.name)
            return False
        self._remember(info)
        return _running(info.get("State") or {})

    # -- watching for exits -----------------------------------------------------------

    def _shown(self, container: str) -> str:
        """A container as a person knows it: its name, not a 64-digit id."""
        if container in (self._container_id, self.settings.container):
            return self.settings.shown_as or self.settings.container
        return container

    @property
    def _container_ref(self) -> str:
        return self._container_id or self.settings.container

    def _remember(self, info: Mapping[str, Any]) -> None:
        self._container_id = str(info.get("Id") or "") or self._container_id
        state = info.get("State") or {}
        self._container_state = state.get("Status")
        healthcheck = (info.get("Config") or {}).get("Healthcheck") or {}
        test = healthcheck.get("Test") or []
        self._has_healthcheck = bool(test) and test[0] != "NONE"
        self._health_status = (state.get("Health") or {}).get("Status") if self._has_healthcheck else None

    async def _subscribe(self) -> None:
        since = self._stream.last_time if self._stream is not None else None
        await self._unsubscribe()
        stream = await self.engine.events(
            {"type": ["container"], "container": [self._container_ref]}, self._event, since=since
        )
        if not self._watching:
            await stream.stop()
            return
        self._stream = stream
        stream.done.addErrback(self._stream_lost, stream)

    async def _unsubscribe(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.stop()

    def _event(self, event: dict[str, Any]) -> None:
        actor = (event.get("Actor") or {}).get("ID") or event.get("id")
        if not self._watching or (self._container_id and actor and actor != self._container_id):
            return
        action = str(event.get("Action") or event.get("status") or "")
        if action.startswith("health_status"):
            self._health_status = action.partition(":")[2].strip() or self._health_status
        elif action in _GONE_ACTIONS:
            self._run(self._report_exit())

    async def _report_exit(self) -> None:
        """The container stopped without us: tell the lifecycle why, with its log."""
        if not self._watching:
            return
        self._watching = False
        reason = "the container is gone"
        try:
            info = await self.engine.inspect(self._container_ref)
            self._remember(info)
            state = info.get("State") or {}
            if _running(state):
                # A restart policy brought it back already: nothing ended.
                self._watching = True
                return
            reason = describe_exit(state)
        except NoSuchContainer:
            self._container_state = "removed"
        except ContainerEngineError as error:
            reason = f"the container stopped (exit code unknown: {error})"
        await self._fetch_logs()
        self._gone(reason)
        await self._unsubscribe()
        self._log.warn("container {container} ended by itself: {reason}",
                       container=self._shown(self.settings.container), reason=reason, service=self.service.name)
        self._exit_handler(reason, list(self.output))

    def _gone(self, reason: str) -> None:
        self._watching = False
        self._last_exit = reason

    async def _fetch_logs(self) -> None:
        try:
            self.output = (await self.engine.logs(self._container_ref, tail=LOG_LINES_KEPT))[-LOG_LINES_KEPT:]
        except ContainerEngineError as error:
            self.output = [f"(no log: {error})"]

    def _stream_lost(self, failure: Any, stream: EventStream) -> None:
        if stream is not self._stream or not self._watching:
            return
        self._engine_error = failure.getErrorMessage()
        self._log.warn("lost the engine's event stream for {container}: {error}; reconnecting",
                       container=self._shown(self.settings.container), error=self._engine_error,
                       service=self.service.name)
        self._reconnect.schedule()

    async def _resubscribe(self) -> None:
        if not self._watching:
            return
        try:
            await self._subscribe()
            info = await self.engine.inspect(self._container_ref)
        except ContainerEngineError as error:
            self._engine_error = str(error)
            self._reconnect.schedule()
            return
        self._engine_error = None
        self._reconnect.succeeded()
        self._remember(info)
        self._log.info("watching {container} again", container=self._shown(self.settings.container),
                       service=self.service.name)
        if not _running(info.get("State") or {}):
            # It ended while we could not hear it.
            await self._report_exit()


@provider(IBackendFactory)
class DockerBackendFactory:
    name = "docker"

    @staticmethod
    def build(service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> DockerBackend:
        return DockerBackend(service, reactor, agent)


__all__ = [
    "ConfigError",
    "DockerBackend",
    "DockerBackendFactory",
    "DockerSettings",
    "shared_engine",
]
