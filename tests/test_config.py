"""
Configuration: every error is one line naming file, service and key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hestia.config import ConfigError
from hestia.loader import load_config, parse_config

pytestmark = pytest.mark.unit


def parse(document: Any, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return parse_config(document, "hestia_config.yml", environ or {})


def error_of(document: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(document, environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_issue_example_parses_with_defaults_inherited() -> None:
    config = parse(
        {
            "server": {"listen": "tcp:8080", "state_path": "hestia.db"},
            "defaults": {"idle_timeout": 300, "start_timeout": 120, "queue_limit": 100,
                         "queue_timeout": 120, "stop_timeout": 10},
            "services": {
                "ollama": {
                    "url": "http://127.0.0.1:11434",
                    "health": {"path": "/api/tags"},
                    "command": ["ollama", "serve"],
                    "env": {"OLLAMA_KEEP_ALIVE": "5m"},
                    "cwd": "/srv/ollama",
                    "keep_warm": False,
                    "idle_timeout": "5m",
                },
                "web": {"url": "http://127.0.0.1:8000/"},
            },
        }
    )
    ollama = config.services["ollama"]
    assert ollama.backend == "process" and ollama.command == ("ollama", "serve")
    assert ollama.idle_timeout == 300 and ollama.start_timeout == 120
    assert ollama.health.path == "/api/tags" and not ollama.health.tcp
    assert config.services["web"].backend == "static"
    assert config.services["web"].url == "http://127.0.0.1:8000"
    assert config.services["web"].health.tcp


def test_a_string_command_runs_under_the_shell() -> None:
    config = parse({"services": {"a": {"url": "http://h:1", "command": "echo hi && serve"}}})
    assert config.services["a"].command == ("/bin/sh", "-c", "echo hi && serve")


@pytest.mark.parametrize(
    "document, expected",
    [
        ({"services": {"ollama": {"url": "http://h:1", "idle_timout": 3}}},
         "hestia_config.yml: services.ollama.idle_timout: unknown key (did you mean idle_timeout?)"),
        ({"services": {"ollama": {"url": "http://h:1", "idle_timeout": "soon"}}},
         "hestia_config.yml: services.ollama.idle_timeout: expected a number of seconds"),
        ({"services": {"Ollama": {"url": "http://h:1"}}},
         "hestia_config.yml: services.Ollama: service names must match"),
        ({"services": {"ollama": {"command": ["x"]}}},
         "hestia_config.yml: services.ollama.url: missing (or set OLLAMA_URL)"),
        ({"services": {"ollama": {"url": "ftp://h"}}}, "services.ollama.url: expected an http://"),
        ({"services": {"ollama": {"url": "http://h:1", "queue_limit": 0}}},
         "services.ollama.queue_limit: must be at least 1"),
        ({"services": {"ollama": {"url": "http://h:1", "keep_warm": "maybe"}}},
         "services.ollama.keep_warm: expected true or false"),
        ({"services": {"ollama": {"url": "http://h:1", "health": {"path": "api"}}}},
         "services.ollama.health.path: must start with '/'"),
        ({"services": {"ollama": {"url": "http://h:1", "command": 5}}}, "services.ollama.command: expected a list"),
        ({"servers": {}}, "hestia_config.yml: servers: unknown key"),
        ({"defaults": {"idle": 1}}, "defaults.idle: unknown key"),
        ({"server": {"log_format": "xml"}}, "server.log_format: expected text or json"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_errors_name_file_service_and_key(document: Any, expected: str) -> None:
    assert expected in error_of(document)


def test_environment_overrides_in_the_seed_style() -> None:
    config = parse(
        {"services": {"my-svc": {"url": "http://h:1", "command": ["x"]}}},
        {"MY_SVC_IDLE_TIMEOUT": "30", "MY_SVC_KEEP_WARM": "true", "MY_SVC_URL": "http://other:2",
         "HESTIA_LISTEN": "tcp:9999"},
    )
    service = config.services["my-svc"]
    assert service.idle_timeout == 30 and service.keep_warm and service.url == "http://other:2"
    assert config.server.listen == "tcp:9999"


def test_environment_override_errors_name_the_key() -> None:
    assert "services.ollama.idle_timeout" in error_of(
        {"services": {"ollama": {"url": "http://h:1"}}}, {"OLLAMA_IDLE_TIMEOUT": "never"}
    )


def test_zero_configuration_fronts_a_local_ollama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"PATH": str(tmp_path)})
    assert list(config.services) == ["ollama"]
    assert config.services["ollama"].url == "http://localhost:11434"
    assert config.services["ollama"].backend == "static"  # no ollama binary on this PATH
    fake = tmp_path / "ollama"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    config = load_config(None, {"PATH": str(tmp_path)})
    assert config.services["ollama"].command == ("ollama", "serve")


def test_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError, match="nope.yml: cannot read"):
        load_config(str(missing), {})
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  a: [\n")
    with pytest.raises(ConfigError, match=r"bad.yml: invalid YAML: line \d+"):
        load_config(str(bad), {})
    good = tmp_path / "good.yml"
    good.write_text("server: {state_path: state/h.db}\nservices:\n  a: {url: 'http://h:1'}\n")
    config = load_config(str(good), {})
    assert config.server.state_path == str(tmp_path / "state" / "h.db")
    assert load_config(None, {"HESTIA_CONFIG": str(good)}).source == str(good)
