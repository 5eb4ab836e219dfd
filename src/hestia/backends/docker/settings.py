"""
A service's C{docker:} section: its keys, its validation, its settings.

Split from the backend so that the configuration loader and container
discovery read settings without importing the engine client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hestia.backends.docker.engine import parse_engine_host
from hestia.config import Reader, ServiceConfig

STOP_MODES = ("stop", "pause")
DOCKER_KEYS = {"container", "host", "stop_mode", "group", "adopt"}


@dataclass(frozen=True)
class DockerSettings:
    """
    A service's C{docker:} section, validated.

    @ivar host: the engine address as written, or C{None} for C{$DOCKER_HOST}
        (else the default Docker socket), resolved when the backend is built.
    """

    container: str
    host: str | None = None
    stop_mode: str = "stop"
    group: tuple[str, ...] = ()
    adopt: bool = True
    shown_as: str | None = None  # the container's name, when C{container} is an id


def parse_host(reader: Reader, value: Any, key: str) -> str:
    """An engine address, checked now so that a typo is a config error, not a 502."""
    host = reader.string(value, key)
    try:
        parse_engine_host(host)
    except ValueError as error:
        raise reader.fail(key, str(error)) from None
    return host


def parse_stop_mode(reader: Reader, value: Any, key: str) -> str:
    if value not in STOP_MODES:
        raise reader.fail(key, f"expected stop or pause, got {value!r}")
    return str(value)


def parse_docker_section(reader: Reader, raw: Mapping[str, Any], key: str, service: str) -> DockerSettings:
    """Validate a service's C{docker:} mapping (called by L{hestia.config})."""
    reader.check_keys(raw, DOCKER_KEYS, key)
    container = reader.string(raw.get("container", service), f"{key}.container")
    host = parse_host(reader, raw["host"], f"{key}.host") if "host" in raw else None
    stop_mode = parse_stop_mode(reader, raw.get("stop_mode", "stop"), f"{key}.stop_mode")
    group_raw = raw.get("group", [])
    if isinstance(group_raw, str):
        group_raw = [group_raw]
    if not isinstance(group_raw, list):
        raise reader.fail(f"{key}.group", f"expected a list of container names, got {type(group_raw).__name__}")
    group = tuple(reader.string(name, f"{key}.group[{index}]") for index, name in enumerate(group_raw))
    adopt = reader.boolean(raw.get("adopt", True), f"{key}.adopt")
    return DockerSettings(container=container, host=host, stop_mode=stop_mode, group=group, adopt=adopt)


def settings_of(service: ServiceConfig) -> DockerSettings:
    section = service.sections.get("docker")
    if isinstance(section, DockerSettings):
        return section
    # Built by hand (tests, plugins): validate it the same way.
    from hestia.config import Reader

    return parse_docker_section(Reader("<service>"), dict(section or {}), f"services.{service.name}.docker",
                                service.name)
