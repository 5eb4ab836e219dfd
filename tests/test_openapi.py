"""
Issue 8, "OpenAPI contract": C{docs/openapi.yaml} against the live gateway.

Schemathesis generates requests for every operation from the contract and
sends them to a real ``twistd -n hestia``; every answer must be a non-5xx
status the contract lists, with a body that matches its schema.  Kept small
(a handful of examples per operation) so it runs in seconds.  A structural
test checks that every Klein route is described, so the contract cannot miss
a route someone adds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.hestiaproc import BackendSpec, HestiaProcess, stop_cleanly

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "docs" / "openapi.yaml"

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

pytestmark = pytest.mark.contract

# Endless streams cannot be read to the end; test_ui.py and test_cli.py cover them.
ENDLESS = re.compile(r"/events/stream$")


@pytest.mark.unit
def test_every_route_is_in_the_contract() -> None:
    from hestia.api import ManagementAPI

    documented = set(yaml.safe_load(CONTRACT.read_text())["paths"])
    routes = set()
    for rule in ManagementAPI.app.url_map.iter_rules():
        if rule.rule == "/" or rule.rule.startswith("/<path:"):
            continue  # the catch-all 404
        routes.add("/v1" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
    assert routes - documented == set(), "routes missing from docs/openapi.yaml"
    assert documented - routes == set(), "docs/openapi.yaml describes routes that do not exist"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HestiaProcess]:
    tmp = tmp_path_factory.mktemp("openapi")
    ollama = BackendSpec("ollama", tmp)
    broken = BackendSpec("broken", tmp)
    gw = HestiaProcess({
        "services": {
            # The contract's example service name: the explicit examples hit it.
            "ollama": ollama.service("--start-delay", "0.1", idle_timeout=0),
            "broken": broken.service("--fail-start", "3", idle_timeout=0),
        },
    }, tmp / "hestia").start()
    try:
        yield gw
    finally:
        stop_cleanly(gw, tmp)


CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]


@pytest.mark.integration
def test_api_matches_contract(gateway: HestiaProcess) -> None:
    """
    Every operation, a few generated requests each (plus the contract's examples).

    Driven by hand rather than by C{schema.parametrize}: schemathesis's pytest
    plugin does not work with pytest 9's nodes.  Each operation runs as its own
    Hypothesis test, synchronously; a failure names the operation and the case.
    """
    # Loaded from the gateway itself: what it serves is what is tested.
    api = schemathesis.openapi.from_url(gateway.url + "/v1/openapi.yaml").exclude(path_regex=ENDLESS.pattern)
    tested = []
    for result in api.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            if case.query:
                case.query.pop("follow", None)  # an endless stream; covered by test_cli.py
            case.call_and_validate(base_url=gateway.url, checks=CHECKS, timeout=20)

        check()
        tested.append(operation.label)
    assert len(tested) >= 12, tested


@pytest.mark.integration
def test_served_contract_is_the_documented_one(gateway: HestiaProcess) -> None:
    response = gateway.http.get("/v1/openapi.yaml")
    assert response.status_code == 200
    assert response.content == CONTRACT.read_bytes()
    assert yaml.safe_load(response.content)["openapi"].startswith("3.")
