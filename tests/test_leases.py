"""
Issue 12, hole 10: every kind of lease has the attributes the proxy reads
(L{ILease}), so an exclusive-group member whose ready backend refuses the
connection answers 502 at once instead of hanging the client with its lease held.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import StartHestia
from support.backendproc import free_port
from support.hestiaproc import BackendSpec
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from hestia.config import ConfigError, ServiceConfig
from hestia.gateway import Gateway
from hestia.interfaces import ILease
from hestia.loader import parse_config
from hestia.testing import FakeBackend


@pytest.mark.unit
def test_every_lease_provides_ilease() -> None:
    config = parse_config({
        "groups": {"gpu": {"exclusive": True}},
        "services": {
            "member": {"url": "http://m:1", "command": ["m"], "group": "gpu"},
            "plain": {"url": "http://p:1"},
            "llm": {"strategy": "failover", "instances": [{"url": "http://a:1"}, {"url": "http://b:1"}]},
        },
    }, "test.yml", {})
    clock = Clock()
    fakes: dict[str, FakeBackend] = {}

    def build(service: ServiceConfig) -> FakeBackend:
        fakes[service.name] = FakeBackend(url=service.url, has_lifecycle=service.backend != "static")
        return fakes[service.name]

    gateway = Gateway(config, clock, build_backend=build)
    for name in ("member", "plain", "llm"):
        leased: list[object] = []
        gateway.route(name).acquire(None).addCallback(leased.append)
        if name == "member":  # a process: it starts first
            fakes["member"].finish_start()
            clock.advance(0.01)
            fakes["member"].answer_probe(True)
        [lease] = leased
        assert verifyObject(ILease, lease), name
        fallback = lease.fallback  # type: ignore[attr-defined]
        assert fallback is None or callable(fallback)
        lease.release()  # type: ignore[attr-defined]
        lease.release()  # type: ignore[attr-defined]  # idempotent
        assert gateway.route(name).in_flight == 0, name


@pytest.mark.unit
def test_an_always_on_service_cannot_hold_an_exclusive_group() -> None:
    with pytest.raises(ConfigError, match="services.up.group: an always-on service"):
        parse_config({"groups": {"gpu": {"exclusive": True}},
                      "services": {"up": {"url": "http://u:1", "group": "gpu"}}}, "test.yml", {})
    # A group that is not exclusive only names its members: any service may be in it.
    parse_config({"groups": {"lan": {}}, "services": {"up": {"url": "http://u:1", "group": "lan"}}}, "test.yml", {})


# Listens until the first connection (the TCP health probe), then stops
# listening and stays alive: a ready backend that now refuses connections.
ACCEPT_ONCE = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "s.accept()\n"
    "s.close()\n"
    "time.sleep(600)\n"
)


@pytest.mark.integration
def test_a_group_member_whose_backend_refuses_gets_502_at_once(hestia: StartHestia, tmp_path: Path) -> None:
    other = BackendSpec("other", tmp_path)
    port = free_port()
    gw = hestia({
        "groups": {"gpu": {"exclusive": True, "min_residency": 0}},
        "services": {
            # The last argument only marks the process as this test's (reap_leftovers).
            "down": {"url": f"http://127.0.0.1:{port}", "health": {"tcp": True}, "group": "gpu",
                     "command": [sys.executable, "-c", ACCEPT_ONCE, str(port), str(tmp_path / "down")]},
            "other": other.service(group="gpu"),
        },
    })
    for _ in range(2):  # the second one shows the first left nothing held
        began = time.monotonic()
        answer = gw.http.get("/services/down/anything", timeout=10.0)
        assert answer.status_code == 502, answer.text
        assert "unreachable" in answer.json()["error"]
        assert time.monotonic() - began < 8.0
    assert gw.status("down")["in_flight"] == 0
    # The group is still usable: down yields it (nothing in flight), other starts and answers.
    assert gw.http.get("/services/other/health", timeout=15.0).status_code == 200
    assert gw.state("down") == "stopped"
