"""
Label discovery: containers that ask to be services, with no YAML.

::

    docker:                 # top level of hestia_config.yml
      discover: true
      host: unix:///var/run/docker.sock   # default: $DOCKER_HOST, else this socket
      adopt: true           # running labelled containers are adopted as ready
      stop_mode: stop       # or pause, for every discovered service

A container labelled C{hestia.enable=true} and C{hestia.url=http://...} (or
C{hestia.port=8096}, meaning C{http://127.0.0.1:8096}) becomes a service named
after the container (or C{hestia.name}), with optional C{hestia.idle_timeout},
C{hestia.health_path} and C{hestia.stop_mode}.  The rest comes from
C{defaults:}.

The engine's C{/events} stream says when containers come and go; rather than
apply each event (Docker and Podman name them differently, and an event may be
missed while the engine restarts), any container event triggers one coalesced
re-list of the labelled containers, and the gateway is brought in line with
that list.  A lost stream is re-subscribed with backoff, followed by a re-list.
A name the YAML already defines belongs to the YAML.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hestia.backends.docker.backend import shared_engine
from hestia.backends.docker.engine import ContainerEngineError, DockerEngine, EventStream
from hestia.backends.docker.reconnect import Reconnect
from hestia.backends.docker.settings import DockerSettings, parse_host, parse_stop_mode
from hestia.config import SERVICE_NAME, Config, ConfigError, HealthCheck, Reader, ServiceConfig, Tunables
from hestia.passive import default_passive_rule

T = TypeVar("T")
log = Logger(namespace="hestia.discovery")

DISCOVERY_KEYS = {"discover", "host", "adopt", "stop_mode"}
ENABLE_LABEL = "hestia.enable=true"
# Container events after which the labelled set may have changed.
_RELEVANT = {"create", "destroy", "remove", "rename", "update"}


class ServiceRegistry(Protocol):
    """What discovery changes: the gateway's services (L{hestia.gateway.Gateway} has this shape)."""

    @property
    def config(self) -> Config: ...

    def add_service(self, service: ServiceConfig) -> bool: ...

    def remove_service(self, name: str) -> None: ...


@dataclass(frozen=True)
class DiscoverySettings:
    """The top-level C{docker:} section."""

    discover: bool = False
    host: str | None = None
    adopt: bool = True
    stop_mode: str = "stop"


def parse_discovery_section(reader: Reader, raw: Any, key: str) -> DiscoverySettings:
    """Validate the top-level C{docker:} mapping (called by L{hestia.config})."""
    section = reader.mapping(raw, key)
    reader.check_keys(section, DISCOVERY_KEYS, key)
    return DiscoverySettings(
        discover=reader.boolean(section.get("discover", False), f"{key}.discover"),
        host=parse_host(reader, section["host"], f"{key}.host") if "host" in section else None,
        adopt=reader.boolean(section.get("adopt", True), f"{key}.adopt"),
        stop_mode=parse_stop_mode(reader, section.get("stop_mode", "stop"), f"{key}.stop_mode"),
    )


def container_name(container: Mapping[str, Any]) -> str:
    names = container.get("Names") or []
    return str(names[0]).lstrip("/") if names else str(container.get("Id", ""))[:12]


def service_from_labels(
    container: Mapping[str, Any], settings: DiscoverySettings, defaults: Tunables
) -> ServiceConfig:
    """
    The service a labelled container (an entry of C{GET /containers/json}) asks for.

    @raise ConfigError: naming the container and the label, when a label is bad.
    """
    name = container_name(container)
    labels: Mapping[str, str] = container.get("Labels") or {}
    reader = Reader(f"container {name}")
    service_name = labels.get("hestia.name", name)
    if not SERVICE_NAME.match(service_name):
        raise reader.fail("hestia.name", f"service names must match [a-z0-9][a-z0-9_-]*, got {service_name!r}"
                          " (set the hestia.name label)")
    if "hestia.url" in labels:
        url = reader.url(labels["hestia.url"], "hestia.url")
    elif "hestia.port" in labels:
        port = reader.integer(labels["hestia.port"], "hestia.port", minimum=1, maximum=65535)
        if port > 65535:
            raise reader.fail("hestia.port", f"not a port: {port}")
        url = f"http://127.0.0.1:{port}"
    else:
        raise reader.fail("hestia.url", "missing (give hestia.url or hestia.port)")
    tunables = defaults
    if "hestia.idle_timeout" in labels:
        tunables = replace(tunables, idle_timeout=reader.duration(labels["hestia.idle_timeout"], "hestia.idle_timeout"))
    check = HealthCheck()
    if "hestia.health_path" in labels:
        path = reader.string(labels["hestia.health_path"], "hestia.health_path")
        if not path.startswith("/"):
            raise reader.fail("hestia.health_path", f"must start with '/', got {path!r}")
        check = replace(check, path=path, tcp=False)
    stop_mode = settings.stop_mode
    if "hestia.stop_mode" in labels:
        stop_mode = parse_stop_mode(reader, labels["hestia.stop_mode"], "hestia.stop_mode")
    # By id: a container re-created under the same name is another container.
    docker = DockerSettings(container=str(container.get("Id") or name), host=settings.host,
                            stop_mode=stop_mode, adopt=settings.adopt, shown_as=name)
    return ServiceConfig(name=service_name, url=url, backend="docker", tunables=tunables, health=check,
                         sections={"docker": docker})


class DockerDiscovery(Service):
    """Keeps the gateway's discovered services in line with the labelled containers."""

    name = "docker-discovery"

    def __init__(self, gateway: ServiceRegistry, settings: DiscoverySettings, reactor: IReactorTime,
                 engine: DockerEngine | None = None) -> None:
        self.gateway = gateway
        self.settings = settings
        self.reactor = reactor
        self.engine = engine or shared_engine(reactor, settings.host)
        self.owned: set[str] = set()
        self.last_error: str | None = None
        self._stream: EventStream | None = None
        self._retry = Reconnect(reactor, lambda: self._run(self._connect()))
        self._syncing = False
        self._dirty = False
        self._warned: set[str] = set()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coroutine)

    def startService(self) -> None:
        super().startService()
        self._run(self._connect())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._retry.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            return stream.stop()
        return Deferred.fromCoroutine(_nothing())

    async def _connect(self) -> None:
        if not self.running:
            return
        try:
            stream = await self.engine.events({"type": ["container"]}, self._event)
        except ContainerEngineError as error:
            self._lost(str(error))
            return
        if not self.running:
            await stream.stop()
            return
        self._stream = stream

        def lost(failure: Any) -> None:
            if stream is self._stream:
                self._lost(failure.getErrorMessage())

        stream.done.addErrback(lost)
        await self.sync()

    def _lost(self, error: str) -> None:
        self._stream = None
        if not self.running:
            return
        if error != self.last_error:
            log.warn("container discovery: {error}; retrying", error=error)
        self.last_error = error
        self._retry.schedule()

    def _event(self, event: dict[str, Any]) -> None:
        if str(event.get("Action") or event.get("status") or "") in _RELEVANT:
            self._run(self.sync())

    async def sync(self) -> None:
        """Re-list the labelled containers and add, change or remove services to match."""
        if self._syncing:
            self._dirty = True
            return
        self._syncing = True
        try:
            while True:
                self._dirty = False
                try:
                    containers = await self.engine.list_containers({"label": [ENABLE_LABEL]})
                except ContainerEngineError as error:
                    self._lost(str(error))
                    if self._stream is not None:
                        await self._stream.stop()
                    return
                self.last_error = None
                self._retry.succeeded()
                self._apply(containers)
                if not self._dirty:
                    return
        finally:
            self._syncing = False

    def _apply(self, containers: list[dict[str, Any]]) -> None:
        wanted: dict[str, ServiceConfig] = {}
        for container in containers:
            try:
                service = service_from_labels(container, self.settings, self.gateway.config.defaults)
                # Issue 17: a labelled container answers monitors by the top-level passive: rule.
                service = replace(service, passive=default_passive_rule(self.gateway.config))
            except ConfigError as error:
                if str(error) not in self._warned:
                    self._warned.add(str(error))
                    log.warn("not a service: {error}", error=str(error))
                continue
            if service.name in self.gateway.config.services or service.name in wanted:
                key = f"duplicate:{service.name}:{container_name(container)}"
                if key not in self._warned:
                    self._warned.add(key)
                    log.warn("container {container} is not used: service {name} is already defined",
                             container=container_name(container), name=service.name)
                continue
            wanted[service.name] = service
        for name in sorted(self.owned - set(wanted)):
            log.info("container of service {name} is gone: removing it", name=name)
            self.gateway.remove_service(name)
            self.owned.discard(name)
        for name, service in wanted.items():
            if self.gateway.add_service(service):
                log.info("discovered service {name} ({url})", name=name, url=service.url)
            self.owned.add(name)


async def _nothing() -> None:
    return None


def discovery_service(gateway: ServiceRegistry, config: Config, reactor: IReactorTime) -> DockerDiscovery | None:
    """The discovery service when C{docker: {discover: true}} asks for it."""
    settings = config.sections.get("docker")
    if isinstance(settings, DiscoverySettings) and settings.discover:
        return DockerDiscovery(gateway, settings, reactor)
    return None
