"""
Configuration rules that mutation testing (issue 21) found unpinned: the server's hygiene keys,
sizes, health checks, the boolean words, durations and their edge cases, URLs, commands,
composite services and the environment overrides.  Through parse_config/load_config only, and
errors are judged by the key they name (ConfigError.key) and a word or two of the message, so
that rewording a message does not break them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hestia.config import ConfigError, ServerConfig, describe_command, env_prefix
from hestia.loader import load_config, parse_config

pytestmark = pytest.mark.unit


def parse(raw: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    return parse_config(raw, "test.yml", environ=environ or {})


def server(**keys: Any) -> ServerConfig:
    return parse({"server": keys}).server


def service(environ: dict[str, str] | None = None, **keys: Any) -> Any:
    return parse({"services": {"svc": {"url": "http://127.0.0.1:9", **keys}}}, environ).services["svc"]


def refused(raw: dict[str, Any], environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(raw, environ)
    assert str(caught.value).startswith("test.yml: ") and "\n" not in str(caught.value)
    return caught.value


def refused_service(**keys: Any) -> ConfigError:
    return refused({"services": {"svc": {"url": "http://127.0.0.1:9", **keys}}})


# -- server: -------------------------------------------------------------------------


def test_server_timeouts_parse_durations() -> None:
    parsed = server(header_timeout="2.5s", connection_idle_timeout="2m")
    assert parsed.header_timeout == 2.5 and parsed.connection_idle_timeout == 120.0
    assert server(header_timeout=7).header_timeout == 7.0
    assert server().header_timeout == 10.0 and server().connection_idle_timeout == 60.0


@pytest.mark.parametrize("name", ["header_timeout", "connection_idle_timeout"])
@pytest.mark.parametrize("value", [0, "0s", -1, "soon", True])
def test_server_timeouts_must_be_positive_durations(name: str, value: Any) -> None:
    assert refused({"server": {name: value}}).key == f"server.{name}"


@pytest.mark.parametrize(
    ("value", "size"),
    [(1048576, 1048576), ("512k", 512 * 1024), ("512K", 512 * 1024), ("10m", 10 * 1024**2),
     ("4g", 4 * 1024**3), ("2KiB", 2048), ("3mb", 3 * 1024**2), ("100", 100), (" 7 b ", 7), (0, 0)],
)
def test_sizes(value: Any, size: int) -> None:
    assert server(max_body_size=value).max_body_size == size


@pytest.mark.parametrize("value", ["512x", "", "-1k", -5, 1.5, True, "k", None])
def test_bad_sizes(value: Any) -> None:
    assert refused({"server": {"max_body_size": value}}).key == "server.max_body_size"


def test_header_size_has_a_floor_of_1k() -> None:
    assert server(max_header_size="1k").max_header_size == 1024
    assert refused({"server": {"max_header_size": 1023}}).key == "server.max_header_size"
    assert server().max_header_size == 16384


def test_server_strings_and_flags() -> None:
    parsed = server(listen="tcp:9999", log_format="json", redirect_listen="tcp:80", watch_config="on",
                    max_backend_connections="12", shutdown_timeout="3s")
    assert (parsed.listen, parsed.log_format, parsed.redirect_listen) == ("tcp:9999", "json", "tcp:80")
    assert parsed.watch_config is True and parsed.max_backend_connections == 12
    assert parsed.shutdown_timeout == 3.0
    assert server().redirect_listen is None and server().watch_config is False
    assert refused({"server": {"log_format": "xml"}}).key == "server.log_format"
    assert refused({"server": {"listen": ""}}).key == "server.listen"
    assert refused({"server": {"redirect_listen": ""}}).key == "server.redirect_listen"
    assert refused({"server": {"max_backend_connections": 0}}).key == "server.max_backend_connections"
    assert parse({}, {"HESTIA_LISTEN": "tcp:7000"}).server.listen == "tcp:7000"


def test_state_path_is_relative_to_the_files_directory(tmp_path: Path) -> None:
    file = tmp_path / "hestia.yml"
    file.write_text("server:\n  state_path: state/h.db\nservices: {}\n")
    assert load_config(str(file), environ={}).server.state_path == str(tmp_path / "state" / "h.db")
    file.write_text("server:\n  state_path: ':memory:'\n")
    assert load_config(str(file), environ={}).server.state_path == ":memory:"


def test_load_config_reports_the_file_and_the_yaml_line(tmp_path: Path) -> None:
    file = tmp_path / "bad.yml"
    file.write_text("services:\n  a: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(file), environ={})
    assert str(caught.value).startswith(f"{file}: invalid YAML: line ")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yml"), environ={})
    file.write_text("services: {}\n")
    assert load_config(None, environ={"HESTIA_CONFIG": str(file)}).source == str(file)


# -- durations, booleans, integers --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), ("0", 0.0), ("0s", 0.0), (90, 90.0), (1.5, 1.5), ("250ms", 0.25), ("30s", 30.0),
     ("5m", 300.0), ("2h", 7200.0), (" 10 ", 10.0), ("1.5m", 90.0)],
)
def test_durations(value: Any, seconds: float) -> None:
    assert service(idle_timeout=value).idle_timeout == seconds


@pytest.mark.parametrize("value", [True, False, "", "5 minutes", "-3s", -1, "1d", None, [1]])
def test_bad_durations(value: Any) -> None:
    error = refused_service(idle_timeout=value)
    assert error.key == "services.svc.idle_timeout"


@pytest.mark.parametrize(
    ("word", "meaning"),
    [(True, True), (False, False), ("true", True), ("on", True), ("yes", True), ("1", True), (" ON ", True),
     ("false", False), ("off", False), ("no", False), ("0", False), ("False", False)],
)
def test_boolean_words(word: Any, meaning: bool) -> None:
    assert service(keep_warm=word).keep_warm is meaning


@pytest.mark.parametrize("word", ["maybe", "", 1, 0, None, "2"])
def test_bad_booleans(word: Any) -> None:
    assert refused_service(keep_warm=word).key == "services.svc.keep_warm"


def test_queue_limit_is_a_whole_number_of_at_least_one() -> None:
    assert service(queue_limit=1).queue_limit == 1
    assert service(queue_limit=" 40 ").queue_limit == 40
    for bad in (0, -2, 1.5, True, "many"):
        assert refused_service(queue_limit=bad).key == "services.svc.queue_limit"


def test_defaults_are_inherited_and_overridden() -> None:
    config = parse({
        "defaults": {"idle_timeout": "1m", "queue_limit": 3, "stop_timeout": 4},
        "services": {"a": {"url": "http://127.0.0.1:1"}, "b": {"url": "http://127.0.0.1:2", "idle_timeout": 5}},
    })
    assert config.services["a"].idle_timeout == 60.0 and config.services["b"].idle_timeout == 5.0
    assert config.services["a"].queue_limit == 3 and config.services["b"].stop_timeout == 4.0
    assert config.services["a"].start_timeout == 120.0 and config.services["a"].queue_timeout == 120.0
    assert refused({"defaults": {"idle_timout": 1}}).key == "defaults.idle_timout"


# -- health ---------------------------------------------------------------------------------


def test_health_checks() -> None:
    assert service().health.tcp is True and service().health.path is None
    tcp = service(health={"tcp": True, "interval": "1s", "timeout": "3s"}).health
    assert (tcp.tcp, tcp.path, tcp.interval, tcp.timeout) == (True, None, 1.0, 3.0)
    http = service(health={"path": "/ready"}).health
    assert (http.tcp, http.path) == (False, "/ready")
    assert service(health={"interval": 0}).health.interval == 0.005  # a floor, not a busy loop
    assert service(health={"path": "/x", "tcp": False}).health.path == "/x"


@pytest.mark.parametrize(
    ("health", "key"),
    [({"tcp": False}, "services.svc.health"), ({"path": "ready"}, "services.svc.health.path"),
     ({"path": "/x", "tcp": True}, "services.svc.health.tcp"), ({"pth": "/x"}, "services.svc.health.pth"),
     ("yes", "services.svc.health"), ({"path": ""}, "services.svc.health.path")],
)
def test_bad_health_checks(health: Any, key: str) -> None:
    assert refused_service(health=health).key == key


# -- urls, commands, backends --------------------------------------------------------------


def test_urls() -> None:
    assert service(url="http://127.0.0.1:9/").url == "http://127.0.0.1:9"
    assert service(url="https://example.com:65535/base").url == "https://example.com:65535/base"
    for bad in ("http://127.0.0.1:65536", "http://127.0.0.1:port", "ftp://host", "http://", "", 8080):
        assert refused_service(url=bad).key == "services.svc.url", bad
    assert "bad port" in str(refused_service(url="http://127.0.0.1:70000"))


def test_a_missing_url_names_the_environment_variable() -> None:
    error = refused({"services": {"my-svc": {"command": "serve"}}})
    assert error.key == "services.my-svc.url" and "MY_SVC_URL" in str(error)
    assert env_prefix("my-svc") == "MY_SVC"


def test_commands_and_backends() -> None:
    shell = service(command="serve --port 9")
    assert shell.command == ("/bin/sh", "-c", "serve --port 9") and shell.backend == "process"
    argv = service(command=["serve", "--port", 9])
    assert argv.command == ("serve", "--port", "9")
    assert describe_command(shell.command) == "serve --port 9"
    assert describe_command(argv.command) == "serve --port 9"
    assert describe_command(("a b", "c")) == "'a b' c"
    assert describe_command(None) is None
    static = service()
    assert static.backend == "static" and static.command is None
    for bad in ("", "   ", [], [None], {"a": 1}):
        assert refused_service(command=bad).key == "services.svc.command"


def test_service_fields() -> None:
    svc = service(env={"A": 1, "B": "x"}, cwd="/srv", pass_authorization="yes", on_cold="hold")
    assert dict(svc.env) == {"A": "1", "B": "x"} and svc.cwd == "/srv"
    assert svc.pass_authorization is True and svc.on_cold == "hold"
    default = service()
    assert default.on_cold == "page" and default.pass_authorization is False and default.keep_warm is False
    assert refused_service(on_cold="wait").key == "services.svc.on_cold"
    assert refused_service(cwd="").key == "services.svc.cwd"
    assert refused_service(env=["A=1"]).key == "services.svc.env"


def test_service_names_and_unknown_keys() -> None:
    assert refused({"services": {"Bad_Name": {"url": "http://127.0.0.1:9"}}}).key == "services.Bad_Name"
    error = refused_service(idle_timout=3)
    assert error.key == "services.svc.idle_timout" and "idle_timeout" in str(error)
    assert refused({"servces": {}}).key == "servces"
    assert refused({"services": {"svc": "http://x"}}).key == "services.svc"


def test_an_instances_service_has_neither_url_nor_command() -> None:
    instances = [{"url": "http://127.0.0.1:1", "command": "a"}, {"url": "http://127.0.0.1:2", "command": "b"}]
    composite = parse({"services": {"pool": {"instances": instances}}}).services["pool"]
    assert composite.backend == "instances" and composite.url == ""
    error = refused({"services": {"pool": {"instances": instances, "command": "serve"}}})
    assert error.key == "services.pool"
    assert refused({"services": {"pool": {"instances": instances, "url": "http://127.0.0.1:3"}}}).key == (
        "services.pool.url"
    )


def test_only_one_backend_per_service() -> None:
    error = refused_service(command="serve", docker={"image": "nginx"})
    assert error.key == "services.svc"


# -- the environment ---------------------------------------------------------------------------


def test_environment_overrides_the_file() -> None:
    environ = {"SVC_IDLE_TIMEOUT": "5m", "SVC_KEEP_WARM": "on", "SVC_URL": "http://127.0.0.1:7",
               "SVC_COMMAND": "serve", "SVC_CWD": "/tmp", "SVC_QUEUE_LIMIT": "9", "OTHER_URL": "http://x:1"}
    svc = service(environ, idle_timeout=1)
    assert svc.idle_timeout == 300.0 and svc.keep_warm is True and svc.url == "http://127.0.0.1:7"
    assert svc.command == ("/bin/sh", "-c", "serve") and svc.cwd == "/tmp" and svc.queue_limit == 9
    assert refused({"services": {"svc": {"url": "http://127.0.0.1:9"}}}, {"SVC_IDLE_TIMEOUT": "never"}).key == (
        "services.svc.idle_timeout"
    )


def test_semaphore_enabled_false_removes_the_section() -> None:
    raw = {"services": {"svc": {"url": "http://127.0.0.1:9",
                                "semaphore": {"machine_id": 1, "start_template_id": 2, "stop_template_id": 3}}}}
    svc = parse(raw, {"SVC_SEMAPHORE_ENABLED": "false"}).services["svc"]
    assert "semaphore" not in svc.sections and svc.backend == "static"
    error = refused(raw, {"SVC_SEMAPHORE_ENABLED": "perhaps"})
    assert error.key.startswith("services.svc.semaphore.enabled")


def test_semaphore_enabled_names_a_service_only_when_true() -> None:
    assert "ghost" not in parse({}, {"GHOST_SEMAPHORE_ENABLED": "off"}).services
    assert "ghost" not in parse({}, {"GHOST_SEMAPHORE_ENABLED": "0"}).services
    assert "ghost" not in parse({}, {"_SEMAPHORE_ENABLED": "true"}).services
    assert parse({}, {}).services == {}


# -- found by the second mutation run -------------------------------------------------------


def yaml_reader_error(tmp_path: Path) -> str:
    """A control character: PyYAML's ReaderError, which has no problem_mark."""
    file = tmp_path / "control.yml"
    file.write_bytes(b"services:\x07\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(file), environ={})
    assert str(caught.value).startswith(f"{file}: invalid YAML: unacceptable character #x0007")
    return str(caught.value)


def test_a_yaml_error_without_a_position_is_a_config_error(tmp_path: Path) -> None:
    yaml_reader_error(tmp_path)


def test_a_yaml_error_without_a_position_is_one_line(tmp_path: Path) -> None:
    assert "\n" not in yaml_reader_error(tmp_path)


def test_services_must_be_a_mapping_and_is_not_a_feature_section() -> None:
    assert refused({"services": ["a"]}).key == "services"
    config = parse({"services": {"svc": {"url": "http://127.0.0.1:9"}}, "groups": {}})
    assert "groups" in config.sections and "services" not in config.sections
    assert "server" not in config.sections and "defaults" not in config.sections


def test_without_a_file_hestia_fronts_a_local_ollama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={"PATH": str(tmp_path)})
    assert config.source == "<built-in defaults>"
    ollama = config.services["ollama"]
    assert ollama.url == "http://localhost:11434" and ollama.health.path == "/api/tags"
    assert ollama.command is None  # no ollama binary on this PATH
    (tmp_path / "ollama").write_text("#!/bin/sh\n")
    (tmp_path / "ollama").chmod(0o755)
    with_binary = load_config(None, environ={"PATH": str(tmp_path)}).services["ollama"]
    assert with_binary.command == ("ollama", "serve") and with_binary.backend == "process"


def test_a_backend_section_is_validated_by_its_backend_with_the_service_name() -> None:
    error = refused_service(exec={"start": "wake"})
    assert error.key == "services.svc.exec.stop" and error.message == "missing: the command that stops svc"
    assert service(exec={"start": "wake", "stop": "sleep"}).backend == "exec"


# -- after the merge: the held-out sample's survivors --------------------------------------------


def test_messages_of_the_common_mistakes() -> None:
    assert refused_service(idle_timeout=-1).message == "must not be negative"
    assert refused({"server": {"log_format": "xml"}}).message == "expected text or json, got str 'xml'"
    assert refused({"server": {"state_path": ""}}).key == "server.state_path"


def test_a_file_that_is_not_utf8_names_the_line_and_the_byte(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yml"
    file.write_bytes(b"services:\n  caf\xe9: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(file), environ={})
    assert str(caught.value) == f"{file}: not UTF-8 text: line 2 has the byte 0xe9"
    assert caught.value.key == ""


# -- the public Reader (hestia.config.reader), after the package split ----------------------------

def test_describe_shows_a_value_whole_up_to_40_characters_then_cuts_it_with_an_ellipsis() -> None:
    from hestia.config import describe

    exact = "x" * 38  # repr adds the quotes: 40 characters
    assert describe(exact) == f"str '{'x' * 38}'"
    longer = "y" * 39  # 41 characters of repr
    assert describe(longer) == "str " + repr(longer)[:37] + "..."
    assert describe(None) == "nothing"


def test_an_unknown_key_with_no_close_match_lists_the_allowed_keys() -> None:
    from hestia.config import ConfigError, Reader

    with pytest.raises(ConfigError) as caught:
        Reader("f.yml").check_keys({"zzzz": 1}, {"alpha", "beta"}, "server")
    assert str(caught.value) == "f.yml: server.zzzz: unknown key (expected one of: alpha, beta)"


def test_duration_errors_say_what_was_given() -> None:
    from hestia.config import ConfigError, Reader

    reader = Reader("f.yml")
    for value, message in ((True, "expected a number of seconds, got bool True"),
                           (float("nan"), "expected a number of seconds, got NaN"),
                           (90000, "must be at most 24h, got int 90000")):
        with pytest.raises(ConfigError) as caught:
            reader.duration(value, "k", maximum=86400)
        assert caught.value.message == message


def test_core_key_errors_name_the_key_and_say_why() -> None:
    from hestia.config import ConfigError
    from hestia.loader import parse_config

    cases = [
        ({"services": {"web": {"url": "http://w:1", "health": {"path": "/", "interval": "soon"}}}},
         "services.web.health.interval", "expected a number of seconds (or '30s', '5m', '1h'), got str 'soon'"),
        ({"server": {"header_timeout": 0}, "services": {}}, "server.header_timeout", "must be more than 0"),
        ({"services": {123: {"url": "http://w:1"}}}, "services.123",
         "service names must be strings, got int 123 (quote it, and names must match [a-z0-9][a-z0-9_-]*)"),
    ]
    for raw, key, message in cases:
        with pytest.raises(ConfigError) as caught:
            parse_config(raw, "f.yml", {})
        assert (caught.value.key, caught.value.message) == (key, message)


def test_feature_sections_hold_only_feature_sections() -> None:
    from hestia.loader import parse_config

    config = parse_config({"server": {"listen": "tcp:9"}, "defaults": {}, "services": {}}, "f.yml", {})
    assert "server" not in config.sections and "defaults" not in config.sections


def _reader_error(call: Any) -> tuple[str, str]:
    from hestia.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        call()
    return caught.value.key, caught.value.message


def test_a_duration_bound_of_whole_days_over_one_day_is_written_in_seconds_and_days() -> None:
    from hestia.config import Reader

    reader = Reader("f.yml")
    assert _reader_error(lambda: reader.duration(2592001, "k", maximum=2592000)) == (
        "k", "must be at most 2592000 seconds (30 days), got int 2592001")
    assert _reader_error(lambda: reader.duration("50h", "k", maximum=172800)) == (
        "k", "must be at most 172800 seconds (2 days), got str '50h'")


def test_a_whole_number_of_seconds_equal_to_the_maximum_is_allowed() -> None:
    from hestia.config import Reader

    assert Reader("f.yml").duration(86400, "k", maximum=86400) == 86400.0
    assert Reader("f.yml").duration(2592000, "k") == 2592000.0  # the default bound, 30 days


def test_integers_start_at_zero_and_name_the_key_past_the_maximum() -> None:
    from hestia.config import Reader

    reader = Reader("f.yml")
    assert reader.integer(0, "k") == 0
    assert reader.integer("0", "k") == 0
    assert _reader_error(lambda: reader.integer(6, "server.limit", maximum=5)) == (
        "server.limit", "must be at most 5, got int 6")


def test_mapping_and_size_errors_say_what_was_given() -> None:
    from hestia.config import Reader

    reader = Reader("f.yml")
    assert _reader_error(lambda: reader.mapping([1, 2], "server")) == ("server", "expected a mapping, got list [1, 2]")
    assert _reader_error(lambda: reader.size("lots", "server.max_body", maximum=10)) == (
        "server.max_body", "expected a size in bytes (or '512k', '10m', '4g'), got str 'lots'")
    assert _reader_error(lambda: reader.size("2k", "server.max_body", maximum=1024)) == (
        "server.max_body", "must be at most 1024 bytes, got str '2k'")


def test_a_url_loses_only_its_trailing_slashes() -> None:
    from hestia.config import Reader

    assert Reader("f.yml").url("http://h:1/apiX/", "k") == "http://h:1/apiX"
    assert Reader("f.yml").url("http://h:1/X//", "k") == "http://h:1/X"
