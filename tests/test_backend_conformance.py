"""
Every built-in backend, built from a minimal configuration as the gateway builds it, provides
what its interfaces promise (issue 15: interfaces at every seam).  A backend that forgets a
method or attribute of L{IBackend}, or declares L{IPersistentBackend}/L{IAdoptableBackend}
without implementing it, fails here, not on the first request that needs it.
"""

from __future__ import annotations

from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any

import pytest
from zope.interface import provider

from hestia.backends import BUILT_IN, ENTRY_POINT_GROUP, find_backend
from hestia.backends.static import StaticBackend
from hestia.config import ServiceConfig
from hestia.interfaces import IBackend, IBackendFactory
from hestia.loader import parse_config
from hestia.testing.conformance import NotConforming, verify_backend

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:9"
# The least each backend needs, as a user writes it.
MINIMAL: dict[str, dict[str, Any]] = {
    "process": {"url": URL, "command": ["serve"]},
    "static": {"url": URL},
    "docker": {"url": URL, "docker": {"container": "app"}},
    "semaphore": {"url": URL, "semaphore": {"machine_id": "m1", "start_template_id": 1, "stop_template_id": 2}},
    "wol": {"url": URL, "wol": {"mac": "52:54:00:ab:cd:ef", "stop_command": ["ssh", "box", "suspend"]}},
    "exec": {"url": URL, "exec": {"start": ["wake"], "stop": ["sleep"]}},
}
SEMAPHORE = {"base_url": "http://127.0.0.1:3000", "project_id": 1}


def test_every_built_in_backend_is_covered() -> None:
    assert sorted(MINIMAL) == sorted(BUILT_IN)


def test_the_entry_points_name_the_built_in_factories() -> None:
    """setup.cfg's entry points (what a third party sees) are the table the gateway uses."""
    declared = {point.name: point.load() for point in entry_points(group=ENTRY_POINT_GROUP)}
    assert {name: declared.get(name) for name in BUILT_IN} == BUILT_IN


def service_of(kind: str) -> ServiceConfig:
    raw: dict[str, Any] = {"services": {"svc": MINIMAL[kind]}}
    if kind == "semaphore":
        raw["semaphore"] = SEMAPHORE
    service = parse_config(raw, "conformance.yml", environ={"SEMAPHORE_API_TOKEN": "t0ken"}).services["svc"]
    assert service.backend == kind
    return service


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_a_built_in_backend_provides_its_interfaces(kind: str) -> None:
    backend = verify_backend(find_backend(kind), service_of(kind))
    assert backend.kind == kind
    assert backend.has_lifecycle is (kind != "static")


class Forgetful(StaticBackend):
    """A backend whose author forgot a method IBackend requires."""

    set_exit_handler = None  # type: ignore[assignment]


@provider(IBackendFactory)
class ForgetfulFactory:
    name = "static"

    @staticmethod
    def build(service: ServiceConfig, reactor: Any, agent: Any) -> IBackend:
        return Forgetful(service, reactor, agent)


@provider(IBackendFactory)
class WrongURLFactory:
    name = "static"

    @staticmethod
    def build(service: ServiceConfig, reactor: Any, agent: Any) -> IBackend:
        return StaticBackend(replace(service, url="http://elsewhere:1"), reactor, agent)


@pytest.mark.parametrize(("factory", "says"), [(ForgetfulFactory, "set_exit_handler"),
                                                (WrongURLFactory, "http://elsewhere:1")])
def test_the_check_a_third_party_runs_fails_on_a_broken_backend(factory: Any, says: str) -> None:
    with pytest.raises(NotConforming, match=says):
        verify_backend(factory, service_of("static"))
