"""
The one loader: reads C{hestia_config.yml} and has every section parsed by its owner.

L{hestia.config} parses the core keys and knows no feature; each feature
parses its own section next to its code (a service's C{docker:} in
L{hestia.backends.docker}, C{groups:} and C{instances:} in L{hestia.routing},
...).  This module calls them all, in one place, so that a start and a
reload validate the same things and a bad file changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from hestia.backends.docker import parse_docker_section
from hestia.backends.docker.discovery import parse_discovery_section
from hestia.backends.exec import parse_exec_section
from hestia.backends.semaphore.settings import resolve_semaphore
from hestia.backends.wol import parse_wol_section
from hestia.config import (
    DEFAULT_CONFIG_FILE,
    Config,
    CoreDocument,
    Reader,
    ServiceConfig,
    Tunables,
    parse_core,
    parse_service,
    read_document,
    zero_config_services,
)
from hestia.costs_config import parse_cost_settings, parse_service_planning
from hestia.gpu import resolve_gpus
from hestia.passive import resolve_passive
from hestia.reload import parse_reload_section
from hestia.routing import parse_routing

# A service's backend sections that their backend's module validates, called as
# parse(reader, raw, key, service_name).  (semaphore: resolve_semaphore, below,
# also needs the top-level section.)
SectionParser = Callable[[Reader, Mapping[str, Any], str, str], Any]
SERVICE_SECTION_PARSERS: Mapping[str, SectionParser] = {
    "docker": parse_docker_section,
    "wol": parse_wol_section,
    "exec": parse_exec_section,
}


def _service_sections(reader: Reader, service: ServiceConfig, raw: Mapping[str, Any]) -> ServiceConfig:
    key = f"services.{service.name}"
    sections = dict(service.sections)
    for name in SERVICE_SECTION_PARSERS.keys() & sections.keys():
        sections[name] = SERVICE_SECTION_PARSERS[name](reader, sections[name], f"{key}.{name}", service.name)
    planning = parse_service_planning(reader, raw, key, service.backend in ("instances", "route"))
    return replace(service, sections=sections, **planning)


def _parse_whole_service(
    reader: Reader, name: str, raw: Any, defaults: Tunables, environ: Mapping[str, str]
) -> ServiceConfig:
    """A service (or an instance) with its backend sections and plan parsed too."""
    return _service_sections(reader, parse_service(reader, name, raw, defaults, environ), reader.mapping(raw, name))


def parse_document(core: CoreDocument, environ: Mapping[str, str]) -> Config:
    """Have every feature parse its sections of a file whose core keys are parsed."""
    reader, document = core.reader, core.document
    config = core.config
    services = {
        name: _service_sections(reader, service, reader.mapping(core.services_raw.get(name), f"services.{name}"))
        for name, service in config.services.items()
    }
    sections = dict(config.sections)
    costs = parse_cost_settings(reader, document)
    if "docker" in sections:
        # Container label discovery (hestia.backends.docker.discovery owns the section).
        sections["docker"] = parse_discovery_section(reader, sections["docker"], "docker")
    services = resolve_passive(reader.source, document.get("passive"), core.services_raw, services)
    sections["gpus"], services = resolve_gpus(reader.source, document.get("gpus"), core.services_raw, services)
    if "reload" in sections:
        sections["reload"] = parse_reload_section(reader, sections["reload"])
    routing = parse_routing(reader.source, services, sections.get("groups"), _parse_whole_service)
    config = replace(config, services=services, sections=sections, routing=routing, costs=costs)
    return resolve_semaphore(config, environ)


def parse_config(raw: Any, source: str, environ: Mapping[str, str], base_dir: Path | None = None) -> Config:
    """
    Validate an already-loaded YAML document, every section of it.

    @param base_dir: what relative paths (C{state_path}) are relative to.
    @raise hestia.config.ConfigError: the first problem found.
    """
    return parse_document(parse_core(raw, source, environ, base_dir), environ)


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """
    Load and validate the configuration.

    @param path: the file to read; C{None} means C{$HESTIA_CONFIG}, else
        C{./hestia_config.yml} if it exists, else the built-in zero
        configuration.  A path that was asked for but does not exist is an error.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("HESTIA_CONFIG")
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).exists():
            return parse_config(
                {"services": zero_config_services(environ)}, "<built-in defaults>", environ, base_dir=Path.cwd()
            )
        path = DEFAULT_CONFIG_FILE
    raw, base_dir = read_document(path)
    return parse_config(raw, str(path), environ, base_dir=base_dir)
