"""
Monitors look without waking (issue 17).

An uptime checker (Uptime Kuma, Prometheus' blackbox exporter, a Kubernetes
probe) asks every minute whether a service is up.  Proxied like any request,
that question starts a stopped service and keeps a ready one from ever idling:
the monitor becomes the service's only user.  A request that matches the
service's I{passive} rule (by C{User-Agent} or by path) is therefore

  - answered by Hestia itself when the service is not ready: C{200} with
    C{{"service": ..., "state": ...}} and an C{X-Hestia-State} header, and
    nothing is started;
  - proxied when it is ready, on a lease that does not count as use: the
    idle clock runs on as if the request had not come.

Configuration: top-level C{passive:} sets the rule for every service, a
service's own C{passive:} replaces it; either may be C{false} (off), C{true}
(the defaults) or a mapping C{{user_agents: [...], paths: [...]}} whose lists
replace the default ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from twisted.web.server import Request

from hestia.config import Config, Reader, ServiceConfig

# Substrings of the User-Agent that common monitors send (compared without case).
DEFAULT_USER_AGENTS = (
    "Uptime-Kuma",
    "Prometheus",
    "Blackbox Exporter",
    "kube-probe",
    "UptimeRobot",
    "Gatus",
    "GoogleHC",
    "ELB-HealthChecker",
    "Consul Health Check",
)
PASSIVE_KEYS = {"user_agents", "paths"}


@dataclass(frozen=True)
class PassiveRule:
    """
    Which requests only look.

    @ivar user_agents: lower-cased substrings of C{User-Agent}.
    @ivar paths: glob patterns (C{fnmatch}, case-sensitive) matched against the
        path below C{/services/<name>}, without the query.
    """

    user_agents: tuple[str, ...] = tuple(agent.lower() for agent in DEFAULT_USER_AGENTS)
    paths: tuple[str, ...] = ()

    def matches(self, request: Request, path: bytes) -> bool:
        if self.user_agents:
            values = request.requestHeaders.getRawHeaders(b"user-agent") or ()
            agent = b" ".join(values).decode("latin-1").lower()
            if agent and any(pattern in agent for pattern in self.user_agents):
                return True
        if self.paths:
            text = path.split(b"?", 1)[0].decode("utf-8", "replace") or "/"
            return any(fnmatchcase(text, pattern) for pattern in self.paths)
        return False


def _strings(reader: Reader, value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise reader.fail(key, "expected a list of non-empty strings")
    return tuple(value)


def parse_passive(reader: Reader, raw: Any, key: str) -> PassiveRule | None:
    """C{false} -> C{None}; C{true} -> the defaults; a mapping -> its lists over the defaults."""
    if isinstance(raw, (bool, str)):
        return PassiveRule() if reader.boolean(raw, key) else None
    section = reader.mapping(raw, key)
    reader.check_keys(section, PASSIVE_KEYS, key)
    rule = PassiveRule()
    if "user_agents" in section:
        agents = _strings(reader, section["user_agents"], f"{key}.user_agents")
        rule = PassiveRule(tuple(agent.lower() for agent in agents), rule.paths)
    if "paths" in section:
        paths = _strings(reader, section["paths"], f"{key}.paths")
        for pattern in paths:
            if not pattern.startswith(("/", "*")):
                raise reader.fail(f"{key}.paths", f"{pattern!r}: a path starts with / (or a * pattern)")
        rule = PassiveRule(rule.user_agents, paths)
    return rule


def resolve_passive(
    source: str, top_level: Any, services_raw: Mapping[str, Any], services: Mapping[str, ServiceConfig]
) -> dict[str, ServiceConfig]:
    """
    Each service with its passive rule: its own C{passive:}, else the top level's.

    @raise ConfigError: naming the file and key.
    """
    reader = Reader(source)
    default = PassiveRule() if top_level is None else parse_passive(reader, top_level, "passive")
    resolved = {}
    for name, service in services.items():
        raw = services_raw.get(name)
        own = raw.get("passive") if isinstance(raw, dict) else None
        rule = default if own is None else parse_passive(reader, own, f"services.{name}.passive")
        resolved[name] = replace(service, passive=rule)
    return resolved


def default_passive_rule(config: Config) -> PassiveRule | None:
    """The top-level rule, for services not from the file (labelled containers)."""
    raw = config.sections.get("passive")
    return PassiveRule() if raw is None else parse_passive(Reader(config.source), raw, "passive")


def write_passive_answer(request: Request, service: str, state: str) -> None:
    """The answer to a monitor asking about a service that is not ready: nothing is started."""
    body = json.dumps({"service": service, "state": state}).encode("utf-8") + b"\n"
    request.setResponseCode(200)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.responseHeaders.setRawHeaders(b"x-hestia-state", [state.encode("ascii")])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    request.responseHeaders.removeHeader(b"server")
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
