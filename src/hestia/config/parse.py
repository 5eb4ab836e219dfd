"""
The core of the file: C{server:}, C{defaults:} and each service's own keys
(url, health, command, tunables), with the C{<NAME>_*} environment overrides.

A feature's section (a service's C{docker:}, the top-level C{groups:}, ...)
is checked to be a mapping here and left as written; its owner parses it,
and L{hestia.loader} calls every owner.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hestia.config.model import (
    BACKEND_SECTIONS,
    HEALTH_KEYS,
    MAX_BODY_SIZE,
    MAX_HEADER_SIZE,
    ROUTING_KEYS,
    SERVER_KEYS,
    SERVICE_KEYS,
    SERVICE_NAME,
    TOP_LEVEL_KEYS,
    TUNABLE_KEYS,
    Config,
    ConfigError,
    HealthCheck,
    ServerConfig,
    ServiceConfig,
    Tunables,
    env_prefix,
)
from hestia.config.reader import BOOLEAN_WORDS, Reader, describe


def _server_limits(reader: Reader, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The C{server:} keys of request hygiene and TLS redirects (see L{hestia.guard})."""
    limits: dict[str, Any] = {}
    for name, maximum in (("max_body_size", MAX_BODY_SIZE), ("max_header_size", MAX_HEADER_SIZE),
                          ("body_min_rate", MAX_BODY_SIZE)):
        if name in raw:
            limits[name] = reader.size(raw[name], f"server.{name}", maximum)
    if limits.get("max_header_size", 1024) < 1024:
        raise reader.fail("server.max_header_size", "must be at least 1k")
    for name in ("header_timeout", "connection_idle_timeout", "body_timeout"):
        if name in raw:
            limits[name] = reader.duration(raw[name], f"server.{name}")
            if limits[name] == 0:
                raise reader.fail(f"server.{name}", "must be more than 0")
    if raw.get("redirect_listen") is not None:
        limits["redirect_listen"] = reader.string(raw["redirect_listen"], "server.redirect_listen")
    return limits



def _tunables(reader: Reader, raw: Mapping[str, Any], base: Tunables, key: str) -> Tunables:
    values: dict[str, Any] = {}
    for name in TUNABLE_KEYS & set(raw):
        where = f"{key}.{name}" if key else name
        if name in ("queue_limit", "max_concurrency"):
            values[name] = reader.integer(raw[name], where, minimum=1)
        else:
            values[name] = reader.duration(raw[name], where)
    return replace(base, **values)


def _health(reader: Reader, raw: Any, key: str) -> HealthCheck:
    if raw is None:
        return HealthCheck()
    section = reader.mapping(raw, key)
    reader.check_keys(section, HEALTH_KEYS, key)
    check = HealthCheck()
    if "path" in section:
        path = reader.string(section["path"], f"{key}.path")
        if not path.startswith("/"):
            raise reader.fail(f"{key}.path", f"must start with '/', got {path!r}")
        check = replace(check, path=path, tcp=False)
    if "tcp" in section:
        tcp = reader.boolean(section["tcp"], f"{key}.tcp")
        if tcp and check.path:
            raise reader.fail(f"{key}.tcp", "give either path or tcp, not both")
        check = replace(check, tcp=tcp)
    if not check.path and not check.tcp:
        raise reader.fail(key, "needs either path: /some/path or tcp: true")
    if "interval" in section:
        check = replace(check, interval=max(0.005, reader.duration(section["interval"], f"{key}.interval")))
    if "timeout" in section:
        check = replace(check, timeout=reader.duration(section["timeout"], f"{key}.timeout"))
    return check


def _command(reader: Reader, value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str) and value.strip():
        # A string is a shell command line, like in a Compose file's `command`.
        return ("/bin/sh", "-c", value)
    if isinstance(value, list) and value and all(isinstance(part, (str, int, float)) for part in value):
        return tuple(str(part) for part in value)
    raise reader.fail(key, f"expected a list of arguments or a shell command string, got {describe(value)}")


def parse_service(
    reader: Reader, name: str, raw: Any, defaults: Tunables, environ: Mapping[str, str]
) -> ServiceConfig:
    """One service's core keys; its feature sections are checked to be mappings, left as written."""
    key = f"services.{name}"
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise reader.fail(key, "service names must match [a-z0-9][a-z0-9_-]*")
    section = dict(reader.mapping(raw, key))
    reader.check_keys(section, SERVICE_KEYS | BACKEND_SECTIONS, key)
    overrides = _environment_overrides(name, environ)
    section.update(overrides)
    try:
        return _parse_service(reader, name, section, defaults, environ, key)
    except ConfigError as error:
        # A value from the environment is not in the file: say where it came from.
        field = error.key.removeprefix(key + ".").split(".", 1)[0]
        if field in overrides and error.key.startswith(key + "."):
            variable = f"{env_prefix(name)}_{field.upper()}"
            raise ConfigError(error.source, error.key, f"{error.message} (from ${variable})") from None
        raise


def _parse_service(
    reader: Reader, name: str, section: dict[str, Any], defaults: Tunables, environ: Mapping[str, str], key: str
) -> ServiceConfig:
    _semaphore_environment(reader, name, section, environ, key)

    routing = {routing_key: section[routing_key] for routing_key in ROUTING_KEYS & set(section)}
    composite = "instances" in routing or "route_by" in routing
    if composite and "url" in section:
        raise reader.fail(f"{key}.url", "a service with instances or route_by has no url of its own")
    if "url" not in section and not composite and "semaphore" not in section:
        raise reader.fail(f"{key}.url", f"missing (or set {env_prefix(name)}_URL)")
    # A semaphore service may have no url: its start task prints hestia_url=.
    url = "" if composite or "url" not in section else reader.url(section["url"], f"{key}.url")
    tunables = _tunables(reader, section, defaults, key)
    health = _health(reader, section.get("health"), f"{key}.health")
    command = _command(reader, section["command"], f"{key}.command") if "command" in section else None
    env = {
        str(var): str(value)
        for var, value in reader.mapping(section.get("env"), f"{key}.env").items()
    }
    cwd = reader.string(section["cwd"], f"{key}.cwd") if "cwd" in section else None
    keep_warm = reader.boolean(section.get("keep_warm", False), f"{key}.keep_warm")
    pass_authorization = reader.boolean(section.get("pass_authorization", False), f"{key}.pass_authorization")
    on_cold = section.get("on_cold", "page")
    if on_cold not in ("page", "hold"):
        raise reader.fail(f"{key}.on_cold", f"expected page or hold, got {describe(on_cold)}")
    sections: dict[str, Any] = {
        section_name: reader.mapping(section[section_name], f"{key}.{section_name}")
        for section_name in BACKEND_SECTIONS & set(section)
    }
    if len(sections) + (command is not None) > 1:
        raise reader.fail(key, f"give only one of command, {', '.join(sorted(BACKEND_SECTIONS))}")
    backend = "process" if command else (next(iter(sections)) if sections else "static")
    if composite:
        if command is not None or sections:
            raise reader.fail(key, "with instances or route_by, give command or a backend section per instance")
        backend = "instances" if "instances" in routing else "route"
    return ServiceConfig(
        name=name,
        url=url,
        backend=backend,
        tunables=tunables,
        health=health,
        command=command,
        env=env,
        cwd=cwd,
        keep_warm=keep_warm,
        pass_authorization=pass_authorization,
        sections=sections,
        on_cold=on_cold,
        routing=routing,
        cancel_abandoned_start=reader.boolean(
            section.get("cancel_abandoned_start", False), f"{key}.cancel_abandoned_start"
        ),
    )


def _environment_overrides(name: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """
    The C{<NAME>_*} variables for one service, as config keys.

    Values stay strings; the typed readers accept C{"true"}, C{"30"}, C{"5m"}.
    """
    prefix = env_prefix(name) + "_"
    overrides: dict[str, Any] = {}
    for key in ("url", "cwd", "keep_warm", *sorted(TUNABLE_KEYS)):
        value = environ.get(prefix + key.upper())
        if value is not None:
            overrides[key] = value
    if (command := environ.get(prefix + "COMMAND")) is not None:
        overrides["command"] = command
    return overrides


SEMAPHORE_ENV_KEYS = ("enabled", "machine_id", "start_template_id", "stop_template_id", "extra_vars")
SEMAPHORE_ENABLED_SUFFIX = "_SEMAPHORE_ENABLED"


def _semaphore_environment(
    reader: Reader, name: str, section: dict[str, Any], environ: Mapping[str, str], key: str
) -> None:
    """
    Merge C{<NAME>_SEMAPHORE_*} into C{section["semaphore"]} (hestia.backends.semaphore.settings
    validates it); C{<NAME>_SEMAPHORE_ENABLED=false} removes the section.
    """
    prefix = env_prefix(name) + "_SEMAPHORE_"
    found = {item: environ[prefix + item.upper()] for item in SEMAPHORE_ENV_KEYS if prefix + item.upper() in environ}
    if not found:
        return
    merged = {**reader.mapping(section.get("semaphore"), f"{key}.semaphore"), **found}
    if reader.boolean(merged.pop("enabled", True), f"{key}.semaphore.enabled ({prefix}ENABLED)"):
        section["semaphore"] = merged
    else:
        section.pop("semaphore", None)


def _services_from_environment(services: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """
    Services enabled by environment alone: C{MYSERVICE_SEMAPHORE_ENABLED=true}
    with no YAML entry names a service C{myservice} (the prefix lower-cased).
    """
    known = {env_prefix(name) for name in services}
    found: dict[str, Any] = {}
    for variable, value in environ.items():
        prefix = variable[: -len(SEMAPHORE_ENABLED_SUFFIX)]
        if not variable.endswith(SEMAPHORE_ENABLED_SUFFIX) or not prefix or prefix in known:
            continue
        if BOOLEAN_WORDS.get(value.strip().lower(), True) and SERVICE_NAME.match(prefix.lower()):
            found[prefix.lower()] = {}
    return found


# What parses one service (its core keys, or all of it): (reader, name, raw, defaults, environ).
ServiceParser = Callable[[Reader, str, Any, Tunables, Mapping[str, str]], ServiceConfig]


@dataclass(frozen=True)
class CoreDocument:
    """
    A file with its core keys parsed: what each feature's parser starts from.

    @ivar config: services and server settings; feature sections still as written.
    @ivar document: the top-level mapping as written.
    @ivar services_raw: each service's mapping as written (services enabled by
        the environment alone included).
    """

    reader: Reader
    config: Config
    document: Mapping[str, Any]
    services_raw: Mapping[str, Any]


def parse_core(raw: Any, source: str, environ: Mapping[str, str], base_dir: Path | None = None) -> CoreDocument:
    """
    Validate the core keys of an already-loaded YAML document.

    @param base_dir: what relative paths (C{state_path}) are relative to.
    """
    reader = Reader(source)
    document = reader.mapping(raw, "")
    reader.check_keys(document, TOP_LEVEL_KEYS, "")

    server_raw = reader.mapping(document.get("server"), "server")
    reader.check_keys(server_raw, SERVER_KEYS, "server")
    listen = environ.get("HESTIA_LISTEN") or server_raw.get("listen", ServerConfig.listen)
    listen = reader.string(listen, "server.listen")
    state_path = reader.string(server_raw.get("state_path", ServerConfig.state_path), "server.state_path")
    if base_dir is not None and state_path != ":memory:":
        state_path = str((base_dir / state_path).resolve())
    log_format = server_raw.get("log_format", ServerConfig.log_format)
    if log_format not in ("text", "json"):
        raise reader.fail("server.log_format", f"expected text or json, got {describe(log_format)}")
    shutdown_timeout = reader.duration(
        server_raw.get("shutdown_timeout", ServerConfig.shutdown_timeout), "server.shutdown_timeout"
    )
    server = ServerConfig(
        listen=listen, state_path=state_path, log_format=log_format, shutdown_timeout=shutdown_timeout,
        max_backend_connections=reader.integer(
            server_raw.get("max_backend_connections", ServerConfig.max_backend_connections),
            "server.max_backend_connections", minimum=1,
        ),
        **_server_limits(reader, server_raw),
        watch_config=reader.boolean(server_raw.get("watch_config", False), "server.watch_config"),
    )

    defaults_raw = reader.mapping(document.get("defaults"), "defaults")
    reader.check_keys(defaults_raw, TUNABLE_KEYS, "defaults")
    defaults = _tunables(reader, defaults_raw, Tunables(), "defaults")

    services_raw = reader.mapping(document.get("services"), "services")
    for name in services_raw:
        if not isinstance(name, str):
            # YAML reads `yes:` as true and `123:` as a number.
            raise reader.fail(f"services.{name}", f"service names must be strings, got {describe(name)} "
                              "(quote it, and names must match [a-z0-9][a-z0-9_-]*)")
    services_raw = {**services_raw, **_services_from_environment(services_raw, environ)}
    services = {
        name: parse_service(reader, name, value, defaults, environ) for name, value in services_raw.items()
    }
    sections = {
        name: document[name]
        for name in TOP_LEVEL_KEYS - {"server", "defaults", "services", "costs", "timezone"}
        if name in document
    }
    config = Config(source=source, server=server, defaults=defaults, services=services, sections=sections)
    return CoreDocument(reader=reader, config=config, document=document, services_raw=services_raw)


def zero_config_services(environ: Mapping[str, str]) -> dict[str, Any]:
    """
    With no file at all, Hestia fronts a local Ollama: the seed's quick start.
    """
    ollama: dict[str, Any] = {"url": "http://localhost:11434", "health": {"path": "/api/tags"}}
    if shutil.which("ollama", path=environ.get("PATH")):
        ollama["command"] = ["ollama", "serve"]
    return {"ollama": ollama}
