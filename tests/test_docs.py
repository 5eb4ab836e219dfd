"""
Issue 8, "Docs and deployment": the documents and deployment files say what the
code does, and the deployment files are valid.

The configuration reference is compared with the schema sets of
C{hestia.config} read at run time: a key added to the code without a line in
the reference (or documented but not accepted) fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import require
from support.hestiaproc import clean_environ

import hestia.config as config_module
import hestia.costs_config as costs_config_module
from hestia.loader import load_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration-reference.md"
SETS = ("TOP_LEVEL_KEYS", "SERVER_KEYS", "TUNABLE_KEYS", "SERVICE_KEYS", "HEALTH_KEYS", "BACKEND_SECTIONS")
# The sections of issue 16, whose keys hestia.costs_config owns.
COST_SETS = ("COSTS_KEYS", "PREWARM_KEYS")

pytestmark = pytest.mark.unit


def documented_keys() -> dict[str, set[str]]:
    """Each C{<!-- keys: NAME -->} marker and the backticked first cells of the table after it."""
    tables: dict[str, set[str]] = {}
    current: str | None = None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if marker := re.match(r"<!--\s*keys:\s*(\w+)\s*-->", line.strip()):
            current = marker.group(1)
            tables[current] = set()
        elif current and (row := re.match(r"\|\s*`([^`]+)`\s*\|", line)):
            tables[current].add(row.group(1))
        elif current and line.startswith("#"):
            current = None
    return tables


@pytest.mark.contract
@pytest.mark.parametrize("name", SETS)
def test_configuration_reference_matches_the_schema(name: str) -> None:
    tables = documented_keys()
    assert name in tables, f"docs/configuration-reference.md has no <!-- keys: {name} --> table"
    code = set(getattr(config_module, name))
    missing = code - tables[name]
    extra = tables[name] - code
    assert not missing, f"{name}: keys the code accepts but the reference does not list: {sorted(missing)}"
    assert not extra, f"{name}: keys the reference lists but the code rejects: {sorted(extra)}"


@pytest.mark.contract
@pytest.mark.parametrize("name", COST_SETS)
def test_configuration_reference_matches_the_cost_sections(name: str) -> None:
    tables = documented_keys()
    assert name in tables, f"docs/configuration-reference.md has no <!-- keys: {name} --> table"
    assert tables[name] == set(getattr(costs_config_module, name))


@pytest.mark.contract
def test_reference_parser_can_fail(tmp_path: Path) -> None:
    """The parser finds rows: an empty table would make the comparison vacuous."""
    tables = documented_keys()
    assert set(SETS) <= set(tables)
    assert all(tables[name] for name in SETS)


def test_shipped_config_loads_and_has_a_demo() -> None:
    config = load_config(str(ROOT / "hestia_config.yml"), environ={})
    assert "ollama" in config.services
    demo = [s for s in config.services.values() if s.command and s.command[0] == "hestia-demo"]
    assert demo, "a demo service that runs on a fresh machine (hestia-demo, installed with Hestia)"


def test_example_configs_in_docs_are_valid(tmp_path: Path) -> None:
    for doc in (REFERENCE, ROOT / "README.md"):
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            raw = yaml.safe_load(block)
            if not isinstance(raw, dict) or "services" not in raw:
                continue
            path = tmp_path / "c.yml"
            path.write_text(block)
            load_config(str(path), environ={})


def test_readme_quick_start() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docker compose up -d" in readme
    assert "curl http://localhost:8080/v1/services/ollama/status" in readme
    assert "./scripts/dev.sh run" in readme and "./scripts/dev.sh test" in readme
    for link in re.findall(r"\]\(((?:docs|contrib|scripts)/[^)#]+)", readme):
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"


def test_docs_exist() -> None:
    for name in ("configuration-reference.md", "troubleshooting.md", "architecture.md", "openapi.yaml"):
        assert (ROOT / "docs" / name).stat().st_size > 500, name


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "needs systemd-analyze (Debian systemd; scripts/install-system-deps.sh)")
    assert analyze is not None
    unit = (ROOT / "contrib" / "systemd" / "hestia.service").read_text()
    for setting in ("DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=hestia", "Restart=on-failure",
                    "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes"):
        assert setting in unit, setting
    # verify checks that ExecStart's binary exists: point it at one that does.
    twistd = shutil.which("twistd") or str(Path(__import__("sys").executable).with_name("twistd"))
    copy = tmp_path / "hestia.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={twistd}", unit, flags=re.M))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60,
                            env=clean_environ({"SYSTEMD_LOG_LEVEL": "warning"}), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # Warnings (an unknown or misspelt setting) do not change the status: none allowed either.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "hestia.service" in line]
    assert not problems, problems


def test_compose_and_dockerfile() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "hestia" in services and len(services) >= 2
    hestia = services["hestia"]
    # localhost:8080, as the quick start says (HESTIA_PUBLISH may widen it).
    assert hestia["ports"] == ["${HESTIA_PUBLISH:-127.0.0.1:8080}:8080"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "twistd" in dockerfile and "hestia" in dockerfile
    compose_config = ROOT / "contrib" / "compose" / "hestia_config.yml"
    config = load_config(str(compose_config), environ={})
    assert "demo" in config.services
    # Ollama is a labelled container that Hestia discovers, starts and stops itself.
    raw = yaml.safe_load(compose_config.read_text())
    assert raw["docker"]["discover"] is True
    labels = services["ollama"]["labels"]
    assert labels["hestia.enable"] == "true" and labels["hestia.name"] == "ollama"
    assert any(volume.endswith(":/var/run/docker.sock") for volume in hestia["volumes"])
