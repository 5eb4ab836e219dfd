"""
The configuration's model: what a validated C{hestia_config.yml} is.

Frozen dataclasses, the bounds every number keeps, and the keys each level
accepts.  This package is a leaf: it imports no other Hestia module, and
each feature parses its own section (with L{hestia.config.Reader}) next to
its code; L{hestia.loader} assembles the whole file.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DEFAULT_CONFIG_FILE = "hestia_config.yml"

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
# Sleeping machines (issue 18): hestia.backends.wol and hestia.backends.exec parse these.
BACKEND_SECTIONS |= {"wol", "exec"}


def env_prefix(name: str) -> str:
    """C{my-service} -> C{MY_SERVICE}: the prefix of a service's variables."""
    return name.upper().replace("-", "_")


def describe_command(command: tuple[str, ...] | None) -> str | None:
    """A command as a person would type it, for status output and logs."""
    if command is None:
        return None
    if command[:2] == ("/bin/sh", "-c"):
        return command[2]
    return shlex.join(command)
