"""
Hestia's configuration: ``hestia_config.yml`` plus environment overrides.

The file is validated strictly and completely before anything runs, because a
gateway that silently ignores a misspelt ``idle_timout`` keeps an expensive
machine running for ever.  Every problem is reported as one line naming the
file, the service and the key (L{ConfigError}), and a reload that fails leaves
the running configuration in place (the caller keeps the old L{Config}).

Environment variables follow the seed README's style: C{HESTIA_CONFIG},
C{HESTIA_LISTEN}, and per service C{<NAME>_URL}, C{<NAME>_IDLE_TIMEOUT},
C{<NAME>_KEEP_WARM}, ... where C{<NAME>} is the service name upper-cased with
C{-} written as C{_}.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DEFAULT_CONFIG_FILE = "hestia_config.yml"

# re.ASCII: "\d" would also match "²" or "٣", which int() and float() refuse.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.ASCII)
_WHOLE_NUMBER = re.compile(r"^\s*\d{1,20}\s*$", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

# The bounds every number in the file must keep (issue 12, hole 6).  A timer
# of .inf or 1e300 seconds cannot be shown as a date, NaN compares false with
# everything (so it slips past every "< 0" check) and is not JSON; no
# setting means anything beyond these.
MAX_DURATION = 30 * 86400.0  # 30 days: longer is "never", which keep_warm says
MAX_COUNT = 100_000  # queue lengths, connection caps, failure counts
MAX_ID = 2**31 - 1  # ids of other systems (Semaphore templates, projects)
MAX_BODY_SIZE = 1024**4  # 1 TiB
MAX_HEADER_SIZE = 1024**2  # 1 MiB of request line plus headers


class ConfigError(Exception):
    """
    A configuration problem, worded for the person who wrote the file.

    C{str()} gives one line: C{file: services.ollama.idle_timeout: message}.
    """

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = _one_line(key)
        self.message = _one_line(message)
        super().__init__(f"{source}: {self.key}: {self.message}" if key else f"{source}: {self.message}")


# Control characters in a key or a value (a YAML key may hold a newline) are
# shown escaped, so that an error stays one line.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def _one_line(text: str) -> str:
    return text.translate(_CONTROL)


@dataclass(frozen=True)
class HealthCheck:
    """
    How to tell that a service is ready.

    @ivar path: an HTTP path answered with 2xx once ready, or C{None}.
    @ivar tcp: C{True} when a TCP connect is the only check.
    @ivar interval: the longest gap between two probes while starting; the
        gap is 0.5% of the time the start has taken so far, at least 5 ms
        (issue 13), so that a quick service is seen within 5 ms; a refused
        probe costs about 0.1 ms of CPU.
    @ivar timeout: how long one probe may take.
    """

    path: str | None = None
    tcp: bool = True
    interval: float = 0.02
    timeout: float = 2.0


@dataclass(frozen=True)
class Tunables:
    """The settings a service inherits from C{defaults:} and may override."""

    idle_timeout: float = 300.0
    start_timeout: float = 120.0
    queue_limit: int = 100
    queue_timeout: float = 120.0
    stop_timeout: float = 10.0
    # Requests in progress with the backend at once, once slow start has
    # widened the window (hestia.admission); the rest wait in order.
    max_concurrency: int = 64
    # Seconds from sending a request to the backend's response head; 0 = none.
    response_timeout: float = 300.0
    # Longest silence in a response body (no byte moved); 0 = none.
    response_idle_timeout: float = 300.0


@dataclass(frozen=True)
class ServiceConfig:
    """
    One service behind the gateway.

    @ivar backend: which backend plugin runs it (C{process}, C{static}, ...).
        Derived from the keys present: C{command} means C{process}; no
        lifecycle keys at all means C{static}.
    @ivar sections: backend-specific sections (C{docker:}, C{semaphore:}) as
        written, for the backend plugin to interpret.
    """

    name: str
    url: str
    backend: str
    tunables: Tunables
    health: HealthCheck = field(default_factory=HealthCheck)
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    keep_warm: bool = False
    sections: Mapping[str, Any] = field(default_factory=dict)
    # Hestia checks only X-Hestia-Token and forwards the client's own
    # Authorization (an OpenAI-style key) to the backend untouched.
    pass_authorization: bool = False
    # Routing keys (instances, route_by, group, ...) as written; hestia.routing
    # parses them (issue 7).  A service with instances or route_by has no url.
    routing: Mapping[str, Any] = field(default_factory=dict)
    # What a browser navigation to a cold service gets: "page" (a waiting page
    # that reloads into the real one) or "hold" (held like any API client).
    on_cold: str = "page"
    # Issue 17: hestia.passive.PassiveRule for monitors' requests, or None (off).
    passive: Any = None
    # Issue 17: stop a start that requests triggered once all of them have left.
    cancel_abandoned_start: bool = False
    # Issue 17: hestia.gpu.GpuClaim (device and memory), or None.
    gpu: Any = None
    # Costs, schedules and predictive warm-up (issue 16; hestia.costs_config):
    # the price of an hour running (None: not given, an instance inherits its
    # service's), the schedule's windows, the prewarm settings.
    cost_per_hour: float | None = None
    schedule: tuple[Any, ...] = ()
    prewarm: Any = None

    @property
    def idle_timeout(self) -> float:
        return self.tunables.idle_timeout

    @property
    def start_timeout(self) -> float:
        return self.tunables.start_timeout

    @property
    def queue_limit(self) -> int:
        return self.tunables.queue_limit

    @property
    def queue_timeout(self) -> float:
        return self.tunables.queue_timeout

    @property
    def stop_timeout(self) -> float:
        return self.tunables.stop_timeout

    @property
    def max_concurrency(self) -> int:
        return self.tunables.max_concurrency

    @property
    def response_timeout(self) -> float:
        return self.tunables.response_timeout

    @property
    def response_idle_timeout(self) -> float:
        return self.tunables.response_idle_timeout


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "tcp:8080"
    state_path: str = "hestia.db"
    log_format: str = "text"
    shutdown_timeout: float = 10.0
    # Concurrent requests forwarded to one backend; the rest wait their turn in
    # the gateway, so a burst of thousands does not open thousands of sockets.
    max_backend_connections: int = 256
    # Request hygiene (hestia.guard): sizes in bytes, times in seconds.
    max_body_size: int = 4 * 1024**3  # 0 = no limit
    max_header_size: int = 16384  # request line plus headers
    header_timeout: float = 10.0  # the whole head must arrive within this
    connection_idle_timeout: float = 60.0  # an idle keep-alive connection is closed
    # A body's read deadline: this long, plus 1 s per body_min_rate bytes
    # received (the defaults of Apache's mod_reqtimeout: body=20,MinRate=500).
    body_timeout: float = 20.0
    body_min_rate: int = 500  # bytes a second; 0 = body_timeout is the whole deadline
    redirect_listen: str | None = None  # plain-HTTP listener that redirects to HTTPS
    watch_config: bool = False  # re-read the file when it changes (hestia.watch), read at start-up


@dataclass(frozen=True)
class Config:
    """
    A complete, validated configuration.

    @ivar source: the file it came from, or C{"<built-in defaults>"}.
    @ivar sections: top-level sections owned by features (C{semaphore:},
        C{auth:}, ...), as written.
    """

    source: str
    server: ServerConfig
    defaults: Tunables
    services: Mapping[str, ServiceConfig]
    sections: Mapping[str, Any] = field(default_factory=dict)
    # hestia.routing.RoutingPlan: instances, model routes, groups, dependencies.
    routing: Any = None
    # hestia.costs_config.CostSettings: currency and time zone (issue 16).
    costs: Any = None


# Keys each level accepts.  A feature that adds a key registers it here, so
# that a typo anywhere is still an error.
TOP_LEVEL_KEYS = {"server", "defaults", "services", "semaphore", "auth", "groups", "docker"}
TOP_LEVEL_KEYS |= {"reload"}  # hestia.reload (issue 19)
SERVER_KEYS = {"listen", "state_path", "log_format", "shutdown_timeout", "max_backend_connections",
               "max_body_size", "max_header_size", "header_timeout", "connection_idle_timeout",
               "body_timeout", "body_min_rate", "redirect_listen", "watch_config"}
TUNABLE_KEYS = {"idle_timeout", "start_timeout", "queue_limit", "queue_timeout", "stop_timeout",
                "max_concurrency", "response_timeout", "response_idle_timeout"}
SERVICE_KEYS = TUNABLE_KEYS | {"url", "health", "command", "env", "cwd", "keep_warm", "on_cold"}
BACKEND_SECTIONS = {"docker", "semaphore"}
# Parsed by hestia.routing (issue 7).
ROUTING_KEYS = {"strategy", "instances", "route_by", "targets", "models", "group", "depends_on", "hosts"}
SERVICE_KEYS |= ROUTING_KEYS
HEALTH_KEYS = {"path", "tcp", "interval", "timeout"}
SERVICE_KEYS |= {"pass_authorization"}  # hestia.auth
# Issue 17 (local AI): parsed by hestia.passive, and by hestia.routing.
TOP_LEVEL_KEYS |= {"passive", "gpus"}
SERVICE_KEYS |= {"passive", "cancel_abandoned_start", "gpu"}
ROUTING_KEYS |= {"aliases", "loading_events"}
SERVICE_KEYS |= ROUTING_KEYS
# Issue 16 (hestia.costs_config): costs, schedules, predictive warm-up.
TOP_LEVEL_KEYS |= {"costs", "timezone"}
SERVICE_KEYS |= {"cost_per_hour", "schedule", "prewarm"}
# ---- sleeping machines (issue 18) ----
# Backend sections that their backend's module validates: section -> "module:function",
# called as function(reader, raw, key, service_name); imported only when used.
SECTION_PARSERS = {
    "wol": "hestia.backends.wol:parse_wol_section",
    "exec": "hestia.backends.exec:parse_exec_section",
}
BACKEND_SECTIONS |= set(SECTION_PARSERS)
# ---- end sleeping machines ----


def env_prefix(name: str) -> str:
    """C{my-service} -> C{MY_SERVICE}: the prefix of a service's variables."""
    return name.upper().replace("-", "_")


class _Reader:
    """Typed accessors that raise L{ConfigError} naming C{source} and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {_describe(value)}")
        return value

    def check_keys(self, value: Mapping[str, Any], allowed: set[str], key: str) -> None:
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                # A misspelling is the usual cause: name the key that was meant.
                close = difflib.get_close_matches(str(name), allowed, n=1)
                if close:
                    raise self.fail(where, f"unknown key (did you mean {close[0]}?)")
                raise self.fail(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def duration(self, value: Any, key: str, maximum: float = MAX_DURATION) -> float:
        if isinstance(value, bool):
            raise self.fail(key, f"expected a number of seconds, got {_describe(value)}")
        if isinstance(value, int) and abs(value) > maximum:
            seconds = math.copysign(math.inf, value)  # float() of a huge int would raise
        elif isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        else:
            raise self.fail(
                key, f"expected a number of seconds (or '30s', '5m', '1h'), got {_describe(value)}"
            )
        if math.isnan(seconds):
            raise self.fail(key, "expected a number of seconds, got NaN")
        if seconds < 0:
            raise self.fail(key, "must not be negative")
        if seconds > maximum:
            raise self.fail(key, f"must be at most {_longest(maximum)}, got {_describe(value)}")
        return seconds

    def integer(self, value: Any, key: str, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
        if isinstance(value, str) and _WHOLE_NUMBER.match(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {_describe(value)}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}")
        if value > maximum:
            raise self.fail(key, f"must be at most {maximum}, got {_describe(value)}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
            return _BOOLEAN_WORDS[value.strip().lower()]
        raise self.fail(key, f"expected true or false, got {_describe(value)}")

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {_describe(value)}")
        return value


def _longest(seconds: float) -> str:
    """A bound as people write it: C{24h}, C{2592000 seconds (30 days)}."""
    if seconds > 86400 and seconds % 86400 == 0:
        return f"{seconds:.0f} seconds ({seconds / 86400:g} days)"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"


_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True,
                  "false": False, "no": False, "off": False, "0": False}


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


_SIZE = re.compile(r"^\s*(\d{1,20})\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE | re.ASCII)


def _size(reader: _Reader, value: Any, key: str, maximum: int) -> int:
    """A byte count: C{1048576}, C{"512k"}, C{"10m"}, C{"4g"} (binary units), at most C{maximum}."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    else:
        match = _SIZE.match(value) if isinstance(value, str) else None
        if match is None:
            raise reader.fail(key, f"expected a size in bytes (or '512k', '10m', '4g'), got {_describe(value)}")
        unit = (match.group(2) or "b")[0].lower()
        size = int(match.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    if size > maximum:
        raise reader.fail(key, f"must be at most {maximum} bytes, got {_describe(value)}")
    return size


def _server_limits(reader: _Reader, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The C{server:} keys of request hygiene and TLS redirects (see L{hestia.guard})."""
    limits: dict[str, Any] = {}
    for name, maximum in (("max_body_size", MAX_BODY_SIZE), ("max_header_size", MAX_HEADER_SIZE),
                          ("body_min_rate", MAX_BODY_SIZE)):
        if name in raw:
            limits[name] = _size(reader, raw[name], f"server.{name}", maximum)
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


def _check_url(reader: _Reader, value: Any, key: str) -> str:
    url = reader.string(value, key)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.fail(key, f"expected an http:// or https:// URL with a host, got {url!r}")
    try:
        _ = parts.port  # Parsing the port is what validates it.
    except ValueError:
        raise reader.fail(key, f"bad port in {url!r}") from None
    return url.rstrip("/")


def _tunables(reader: _Reader, raw: Mapping[str, Any], base: Tunables, key: str) -> Tunables:
    values: dict[str, Any] = {}
    for name in TUNABLE_KEYS & set(raw):
        where = f"{key}.{name}" if key else name
        if name in ("queue_limit", "max_concurrency"):
            values[name] = reader.integer(raw[name], where, minimum=1)
        else:
            values[name] = reader.duration(raw[name], where)
    return replace(base, **values)


def _health(reader: _Reader, raw: Any, key: str) -> HealthCheck:
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


def _command(reader: _Reader, value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str) and value.strip():
        # A string is a shell command line, like in a Compose file's `command`.
        return ("/bin/sh", "-c", value)
    if isinstance(value, list) and value and all(isinstance(part, (str, int, float)) for part in value):
        return tuple(str(part) for part in value)
    raise reader.fail(key, f"expected a list of arguments or a shell command string, got {_describe(value)}")


def _service(
    reader: _Reader, name: str, raw: Any, defaults: Tunables, environ: Mapping[str, str]
) -> ServiceConfig:
    key = f"services.{name}"
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise reader.fail(key, "service names must match [a-z0-9][a-z0-9_-]*")
    section = dict(reader.mapping(raw, key))
    reader.check_keys(section, SERVICE_KEYS | BACKEND_SECTIONS, key)
    section.update(_environment_overrides(name, environ))
    _semaphore_environment(reader, name, section, environ, key)

    routing = {routing_key: section[routing_key] for routing_key in ROUTING_KEYS & set(section)}
    composite = "instances" in routing or "route_by" in routing
    if composite and "url" in section:
        raise reader.fail(f"{key}.url", "a service with instances or route_by has no url of its own")
    if "url" not in section and not composite and "semaphore" not in section:
        raise reader.fail(f"{key}.url", f"missing (or set {env_prefix(name)}_URL)")
    # A semaphore service may have no url: its start task prints hestia_url=.
    url = "" if composite or "url" not in section else _check_url(reader, section["url"], f"{key}.url")
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
        raise reader.fail(f"{key}.on_cold", f"expected page or hold, got {_describe(on_cold)}")
    sections: dict[str, Any] = {
        section_name: reader.mapping(section[section_name], f"{key}.{section_name}")
        for section_name in BACKEND_SECTIONS & set(section)
    }
    if len(sections) + (command is not None) > 1:
        raise reader.fail(key, f"give only one of command, {', '.join(sorted(BACKEND_SECTIONS))}")
    if "docker" in sections:
        # Validated now (and owned by the backend's module), so a typo fails at load time.
        from hestia.backends.docker import parse_docker_section

        sections["docker"] = parse_docker_section(reader, sections["docker"], f"{key}.docker", name)
    for section_name in SECTION_PARSERS.keys() & sections.keys():  # issue 18
        module, _, function = SECTION_PARSERS[section_name].partition(":")
        parse_section = getattr(importlib.import_module(module), function)
        sections[section_name] = parse_section(reader, sections[section_name], f"{key}.{section_name}", name)
    from hestia.costs_config import parse_service_planning

    planning = parse_service_planning(reader, section, key, composite)
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
        **planning,
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
    reader: _Reader, name: str, section: dict[str, Any], environ: Mapping[str, str], key: str
) -> None:
    """
    Merge C{<NAME>_SEMAPHORE_*} into C{section["semaphore"]} (hestia.semaphore
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
        if _BOOLEAN_WORDS.get(value.strip().lower(), True) and SERVICE_NAME.match(prefix.lower()):
            found[prefix.lower()] = {}
    return found


def _zero_config_services(environ: Mapping[str, str]) -> dict[str, Any]:
    """
    With no file at all, Hestia fronts a local Ollama: the seed's quick start.
    """
    ollama: dict[str, Any] = {"url": "http://localhost:11434", "health": {"path": "/api/tags"}}
    if shutil.which("ollama", path=environ.get("PATH")):
        ollama["command"] = ["ollama", "serve"]
    return {"ollama": ollama}


def parse_config(
    raw: Any, source: str, environ: Mapping[str, str], base_dir: Path | None = None
) -> Config:
    """
    Validate an already-loaded YAML document.

    @param base_dir: what relative paths (C{state_path}) are relative to.
    """
    reader = _Reader(source)
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
        raise reader.fail("server.log_format", f"expected text or json, got {_describe(log_format)}")
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
            raise reader.fail(f"services.{name}", f"service names must be strings, got {_describe(name)} "
                              "(quote it, and names must match [a-z0-9][a-z0-9_-]*)")
    services_raw = {**services_raw, **_services_from_environment(services_raw, environ)}
    services = {
        name: _service(reader, name, value, defaults, environ) for name, value in services_raw.items()
    }
    sections = {
        name: document[name]
        for name in TOP_LEVEL_KEYS - {"server", "defaults", "services", "costs", "timezone"}
        if name in document
    }
    from hestia.costs_config import parse_cost_settings

    costs = parse_cost_settings(reader, document)
    if "docker" in sections:
        # Container label discovery (hestia.discovery owns the section).
        from hestia.discovery import parse_discovery_section

        sections["docker"] = parse_discovery_section(reader, sections["docker"], "docker")
    from hestia.passive import resolve_passive  # issue 17: monitors look without waking

    services = resolve_passive(reader.source, document.get("passive"), services_raw, services)
    from hestia.gpu import resolve_gpus  # issue 17: GPU memory as the unit of sharing

    sections["gpus"], services = resolve_gpus(reader.source, document.get("gpus"), services_raw, services)
    if "reload" in sections:
        from hestia.reload import parse_reload_section  # what a reload restarts (issue 19)

        sections["reload"] = parse_reload_section(reader, sections["reload"])
    from hestia.routing import parse_routing  # routing builds on this module

    routing = parse_routing(reader.source, services, sections.get("groups"), environ)
    config = Config(
        source=source, server=server, defaults=defaults, services=services, sections=sections, routing=routing,
        costs=costs,
    )
    from hestia.semaphore import resolve_semaphore  # owns the semaphore sections

    return resolve_semaphore(config, environ)


class _StrictLoader(yaml.SafeLoader):
    """
    A SafeLoader that refuses a key given twice in one mapping.

    PyYAML keeps the last value, so a second C{auth:} block further down would
    silently replace the first (turning authentication off).  Keys merged in
    with C{<<:} may still be overridden: that is what a merge is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # An unhashable key: the base class says so.
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key!r} (first given on line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


# Aliases let a few lines stand for a huge document (nine lines of nine
# aliases each are 9**9 values): Python shares the objects, but every walk
# over the configuration -- a start's json.dumps, a reload's comparison --
# pays for the whole expansion.  A real configuration is far smaller.
MAX_YAML_NODES = 1_000_000


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past L{MAX_YAML_NODES} values, or contain themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to itself", node.start_mark)
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key) + size(value) for key, value in node.value)
        open_nodes.discard(id(node))
        if total > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to more than {MAX_YAML_NODES} values", node.start_mark)
        sizes[id(node)] = total
        return total

    size(root)


def _yaml_document(text: str, source: str) -> Any:
    """Parse C{text}; any YAML problem (duplicate keys too) is one line naming the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(source, "", f"invalid YAML: {where}{problem}") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, RecursionError) as error:
        # PyYAML's constructors of explicit tags (`!!timestamp 2001-01-01x`,
        # `!!int x`, a nesting thousands deep) raise these, not YAMLError.
        raise ConfigError(source, "", f"invalid YAML: a value it cannot read ({type(error).__name__})") from None


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
                {"services": _zero_config_services(environ)},
                "<built-in defaults>",
                environ,
                base_dir=Path.cwd(),
            )
        path = DEFAULT_CONFIG_FILE
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ConfigError(str(path), "", f"cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            str(path), "", f"not UTF-8 text: line {line} has the byte 0x{data[error.start]:02x}"
        ) from None
    raw = _yaml_document(text, str(path))
    return parse_config(raw, str(path), environ, base_dir=file.resolve().parent)


def describe_command(command: tuple[str, ...] | None) -> str | None:
    """A command as a person would type it, for status output and logs."""
    if command is None:
        return None
    if command[:2] == ("/bin/sh", "-c"):
        return command[2]
    return shlex.join(command)
