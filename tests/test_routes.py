"""
Every kind of route provides L{IRoute} (issue 15): a plain service's lifecycle,
a multi-instance route, a model route and an exclusive group's member, each
checked with C{verifyObject} as the gateway holds it.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from hestia.gateway import Gateway
from hestia.groups import GroupMemberRoute
from hestia.interfaces import IInterceptingRoute, ILease, IRoute
from hestia.lifecycle import ServiceLifecycle
from hestia.loader import parse_config
from hestia.routing import ModelRoute, MultiInstanceRoute
from hestia.testing import FakeBackend

pytestmark = pytest.mark.unit

CONFIG = {
    "groups": {"gpu0": {"exclusive": True}},
    "services": {
        "web": {"url": "http://web:1", "command": ["web"]},
        "pool": {"instances": [{"url": "http://a:1", "command": ["a"]}, {"url": "http://b:1", "command": ["b"]}]},
        "ai": {"route_by": "model"},
        "llama": {"url": "http://llama:1", "command": ["llama"], "models": ["llama3:8b"], "group": "gpu0"},
        "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"], "group": "gpu0"},
    },
}


def gateway() -> tuple[Gateway, Clock, dict[str, FakeBackend]]:
    clock = Clock()
    fakes: dict[str, FakeBackend] = {}

    def build(service: Any) -> FakeBackend:
        fakes[service.name] = fake = FakeBackend(url=service.url)
        return fake

    return Gateway(parse_config(CONFIG, "t.yml", {}), clock, agent=object(), build_backend=build), clock, fakes  # type: ignore[arg-type]


def test_every_kind_of_route_provides_iroute() -> None:
    gw, _, _ = gateway()
    kinds = {name: type(route) for name, route in gw.services.items()}
    assert kinds == {"web": ServiceLifecycle, "pool": MultiInstanceRoute, "ai": ModelRoute,
                     "llama": GroupMemberRoute, "qwen": GroupMemberRoute}
    for name, route in gw.services.items():
        assert verifyObject(IRoute, route), name
        assert gw.route(name) is route


def test_only_the_model_route_looks_at_requests_before_a_lease() -> None:
    """The proxy asks IInterceptingRoute (model lists, loading events), not getattr."""
    gw, _, _ = gateway()
    intercepting = {name for name, route in gw.services.items() if IInterceptingRoute.providedBy(route)}
    assert intercepting == {"ai"}
    assert verifyObject(IInterceptingRoute, gw.services["ai"])


def test_every_route_hands_out_ileases() -> None:
    gw, clock, fakes = gateway()
    for name in ("web", "pool", "llama"):
        leases: list[Any] = []
        gw.route(name).acquire().addBoth(leases.append)
        for fake in fakes.values():
            if fake.starts and not fake.starts[-1].called:
                fake.finish_start()
        clock.advance(0.01)
        for fake in fakes.values():
            if fake.probes and not fake.probes[-1].called:
                fake.answer_probe(True)
        clock.advance(0.01)
        assert len(leases) == 1 and verifyObject(ILease, leases[0]), (name, leases)
        leases[0].release()
