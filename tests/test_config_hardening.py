"""
Issue 12, holes 5, 6, 11 and the config parts of 12: whatever the file holds,
loading it either gives a configuration whose every number is finite and
bounded, or one L{ConfigError} line naming file, line or service, and key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hestia.auth import parse_auth
from hestia.config import MAX_BODY_SIZE, MAX_COUNT, MAX_DURATION, ConfigError
from hestia.config.document import _StrictLoader
from hestia.loader import load_config, parse_config
from hestia.preflight import load_checked

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:9"


def load_text(tmp_path: Path, text: str | bytes, environ: dict[str, str] | None = None) -> Any:
    path = tmp_path / "hestia_config.yml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return load_config(str(path), environ or {})


def refusal(tmp_path: Path, text: str | bytes, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, environ)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "hestia_config.yml") + ": ")
    return message


# -- hole 5: duplicate keys ---------------------------------------------------------


def test_a_second_auth_block_is_refused_not_silently_winning(tmp_path: Path) -> None:
    text = (
        "auth:\n"
        "  tokens:\n"
        "    - {name: admin, token_sha256: " + "0" * 64 + ", scopes: [admin]}\n"
        "services:\n"
        f"  web: {{url: '{URL}'}}\n"
        "auth: {}\n"  # would turn authentication off
    )
    message = refusal(tmp_path, text)
    assert "line 6" in message and "duplicate key 'auth'" in message and "line 1" in message


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        (f"services:\n  web: {{url: '{URL}'}}\n  web: {{url: '{URL}'}}\n", 3, "web"),
        (f"services:\n  web:\n    url: '{URL}'\n    idle_timeout: 5\n    idle_timeout: 6\n", 5, "idle_timeout"),
        (f"services:\n  web:\n    url: '{URL}'\n    health: {{path: /a, path: /b}}\n", 4, "path"),
        (f"server: {{listen: 'tcp:1'}}\nserver: {{listen: 'tcp:2'}}\nservices: {{web: {{url: '{URL}'}}}}\n",
         2, "server"),
    ],
    ids=["service", "tunable", "flow-mapping", "top-level"],
)
def test_duplicate_keys_anywhere_name_line_and_key(tmp_path: Path, text: str, line: int, key: str) -> None:
    message = refusal(tmp_path, text)
    assert f"line {line}," in message and f"duplicate key {key!r}" in message


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    base = yaml.load("a: &base {x: 1, y: 2}\nb: {<<: *base, y: 3}\n", Loader=_StrictLoader)  # noqa: S506
    assert base["b"] == {"x": 1, "y": 3}


# -- hole 6: numbers ---------------------------------------------------------------


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.0e+300", "-1", "10000000000000000000000000",
                                   str(int(MAX_DURATION) + 1)])
@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("services:\n  web:\n    url: 'http://127.0.0.1:9'\n    idle_timeout: {v}\n", "services.web.idle_timeout"),
        ("defaults: {{start_timeout: {v}}}\nservices: {{web: {{url: 'http://h:1'}}}}\n", "defaults.start_timeout"),
        ("server: {{header_timeout: {v}}}\nservices: {{web: {{url: 'http://h:1'}}}}\n", "server.header_timeout"),
        ("server: {{shutdown_timeout: {v}}}\nservices: {{web: {{url: 'http://h:1'}}}}\n", "server.shutdown_timeout"),
        ("services:\n  web: {{url: 'http://h:1', health: {{path: /h, interval: {v}}}}}\n",
         "services.web.health.interval"),
        ("groups: {{gpu: {{exclusive: true, min_residency: {v}}}}}\nservices: {{web: {{url: 'http://h:1'}}}}\n",
         "groups.gpu.min_residency"),
        ("auth: {{failure_window: {v}}}\nservices: {{web: {{url: 'http://h:1'}}}}\n", "auth.failure_window"),
    ],
    ids=["service", "defaults", "header_timeout", "shutdown_timeout", "health", "group", "auth"],
)
def test_durations_are_finite_and_bounded(tmp_path: Path, where: str, key: str, value: str) -> None:
    text = where.format(v=value)

    def load() -> None:
        config = load_text(tmp_path, text)
        parse_auth(config, {})

    with pytest.raises(ConfigError) as caught:
        load()
    assert f"{key}:" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f"services: {{web: {{url: '{URL}', queue_limit: {MAX_COUNT + 1}}}}}\n", "services.web.queue_limit"),
        (f"server: {{max_backend_connections: {10**30}}}\n", "server.max_backend_connections"),
        (f"server: {{max_body_size: {MAX_BODY_SIZE + 1}}}\n", "server.max_body_size"),
        ("server: {max_body_size: 99999999g}\n", "server.max_body_size"),
        ("server: {max_header_size: 2m}\n", "server.max_header_size"),
        (f"services: {{web: {{instances: [{{url: '{URL}', cost: .nan}}]}}}}\n", "services.web.instances[0].cost"),
        (f"services: {{web: {{instances: [{{url: '{URL}', cost: .inf}}]}}}}\n", "services.web.instances[0].cost"),
    ],
)
def test_sizes_counts_and_costs_are_bounded(tmp_path: Path, text: str, key: str) -> None:
    assert f"{key}:" in refusal(tmp_path, text)


def test_auth_max_failures_is_bounded(tmp_path: Path) -> None:
    config = load_text(tmp_path, f"auth: {{max_failures: {10**12}}}\nservices: {{web: {{url: '{URL}'}}}}\n")
    with pytest.raises(ConfigError, match="auth.max_failures: must be at most"):
        parse_auth(config, {})


def test_the_largest_accepted_values_still_serialise_as_json(tmp_path: Path) -> None:
    """At the bounds, status and timers stay numbers (no NaN/inf reaches the API)."""
    from twisted.internet.task import Clock

    from hestia.gateway import Gateway
    from hestia.lifecycle import iso_time

    config = load_text(tmp_path, f"services:\n  web: {{url: '{URL}', idle_timeout: {int(MAX_DURATION)}, "
                                 f"start_timeout: 720h, queue_timeout: 43200m}}\n")
    clock = Clock()
    clock.advance(2_000_000_000)  # 2033: the idle deadline is then in 2033 + 30 days
    gateway = Gateway(config, clock)
    json.dumps(gateway.route("web").status(), allow_nan=False)
    # What .inf or 1e300 broke: the idle deadline shown as a date.
    assert iso_time(clock.seconds() + MAX_DURATION) is not None
    assert config.services["web"].idle_timeout == MAX_DURATION


DOCUMENT_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=12,
)
SERVICE_KEYS = st.sampled_from(["url", "idle_timeout", "start_timeout", "queue_limit", "queue_timeout",
                                "stop_timeout", "health", "keep_warm", "command", "instances", "cost"])


@settings(max_examples=300, deadline=None)
@given(
    numbers=st.dictionaries(SERVICE_KEYS, st.integers() | st.floats() | st.text(max_size=10), max_size=4),
    server=st.dictionaries(
        st.sampled_from(["shutdown_timeout", "header_timeout", "connection_idle_timeout", "max_body_size",
                         "max_header_size", "max_backend_connections"]),
        st.integers() | st.floats() | st.text(max_size=10), max_size=3,
    ),
)
def test_every_accepted_number_is_finite_and_bounded(numbers: dict[str, Any], server: dict[str, Any]) -> None:
    document = {"server": server, "services": {"web": {"url": URL, **numbers}}}
    try:
        config = parse_config(document, "hestia_config.yml", {})
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    web = config.services["web"]
    for value in (web.idle_timeout, web.start_timeout, web.queue_timeout, web.stop_timeout,
                  config.server.shutdown_timeout, config.server.header_timeout,
                  config.server.connection_idle_timeout):
        assert math.isfinite(value) and 0 <= value <= MAX_DURATION
    assert 1 <= web.queue_limit <= MAX_COUNT
    assert 0 <= config.server.max_body_size <= MAX_BODY_SIZE


# -- item 12: names, encodings ---------------------------------------------------------


@pytest.mark.parametrize(("name", "shown"), [("123", "services.123"), ("yes", "services.True"),
                                             ("1.5", "services.1.5"), ("~", "services.None")])
def test_non_string_service_names_are_one_line(tmp_path: Path, name: str, shown: str) -> None:
    message = refusal(tmp_path, f"services:\n  {name}: {{url: '{URL}'}}\n")
    assert f"{shown}: service names must be strings" in message


def test_non_string_service_names_with_environment_services(tmp_path: Path) -> None:
    # The environment scan is what crashed: it upper-cased every name.
    message = refusal(tmp_path, f"services:\n  123: {{url: '{URL}'}}\n", {"GPU_SEMAPHORE_ENABLED": "true"})
    assert "services.123" in message


def test_a_non_utf8_file_is_one_line(tmp_path: Path) -> None:
    message = refusal(tmp_path, b"services:\n  web: {url: 'http://h:1', env: {X: '\xff'}}\n")
    assert "not UTF-8" in message and "line 2" in message


BOMB = "".join(
    f"        {name}: &{name} [{', '.join([f'*{previous}'] * 9) if previous else ', '.join(['x'] * 9)}]\n"
    for previous, name in zip([""] + list("abcdefgh"), "abcdefghi")
)


def test_an_alias_bomb_is_refused_at_load(tmp_path: Path) -> None:
    # Found attacking Hestia: nine lines of aliases in free-form extra_vars
    # (9**9 strings once expanded) passed check-config; the first start's
    # json.dumps, or a reload's comparison, would then take the gateway's memory and reactor.
    text = (
        "semaphore: {base_url: 'http://127.0.0.1:3000'}\n"
        "services:\n"
        "  vm:\n"
        f"    url: '{URL}'\n"
        "    semaphore:\n"
        "      start_template_id: 1\n"
        "      stop_template_id: 2\n"
        "      extra_vars:\n" + BOMB
    )
    message = refusal(tmp_path, text, {"SEMAPHORE_API_TOKEN": "t"})
    assert "aliases" in message and "1000000" in message


def test_an_alias_that_contains_itself_is_refused_at_load(tmp_path: Path) -> None:
    # Else json.dumps meets a circular reference at the service's first start.
    text = (
        "semaphore: {base_url: 'http://127.0.0.1:3000'}\n"
        f"services:\n  vm:\n    url: '{URL}'\n"
        "    semaphore: {start_template_id: 1, stop_template_id: 2, extra_vars: {loop: &m [a, *m]}}\n"
    )
    message = refusal(tmp_path, text, {"SEMAPHORE_API_TOKEN": "t"})
    assert "refers to itself" in message


def test_a_few_aliases_are_still_fine(tmp_path: Path) -> None:
    text = f"defaults: &d {{idle_timeout: 60}}\nservices:\n  web: {{url: '{URL}', models: &m [a, b]}}\n" \
           f"  api: {{url: '{URL}', models: *m}}\n"
    assert set(load_text(tmp_path, text).services) == {"web", "api"}


# -- hole 11: semaphore instances ---------------------------------------------------------


def test_a_semaphore_instance_is_refused_at_load(tmp_path: Path) -> None:
    text = (
        "semaphore: {base_url: 'http://127.0.0.1:3000'}\n"
        "services:\n"
        "  llm:\n"
        "    instances:\n"
        f"      - {{url: '{URL}'}}\n"
        "      - {semaphore: {start_template_id: 1, stop_template_id: 2}}\n"
    )
    message = refusal(tmp_path, text, {"SEMAPHORE_API_TOKEN": "t"})
    assert "services.llm.instances[1].semaphore: instances cannot use the semaphore backend" in message


# -- item 12: check-config and the daemon agree ----------------------------------------------


def test_load_checked_refuses_an_unset_token_env(tmp_path: Path) -> None:
    path = tmp_path / "hestia_config.yml"
    path.write_text(f"auth: {{tokens: [{{name: admin, token_env: NOPE_TOKEN, scopes: [admin]}}]}}\n"
                    f"services: {{web: {{url: '{URL}'}}}}\n")
    load_config(str(path), {})  # the file alone is fine...
    with pytest.raises(ConfigError, match="auth.tokens.admin.token_env: environment variable NOPE_TOKEN"):
        load_checked(str(path), {})  # ...but the daemon cannot start with it


@pytest.mark.parametrize("listen", ["bogus:1", "tcp:abc", "tcp:80:nonsense=1", "txsni:/nowhere"])
def test_load_checked_refuses_a_bad_listen(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "hestia_config.yml"
    path.write_text(yaml.safe_dump({"server": {"listen": listen}, "services": {"web": {"url": URL}}}))
    with pytest.raises(ConfigError, match="server.listen: "):
        load_checked(str(path), {})


def test_the_reference_states_the_bounds_the_code_keeps() -> None:
    from hestia.config import MAX_HEADER_SIZE, MAX_ID
    from hestia.routing import MAX_COST
    from hestia.state import LOCK_TIMEOUT

    reference = (Path(__file__).resolve().parents[1] / "docs" / "configuration-reference.md").read_text()
    section = reference.split("<!-- bounds: hestia.config MAX_* -->", 1)[1].split("## ", 1)[0]
    for number in (int(MAX_DURATION), MAX_COUNT, MAX_BODY_SIZE, MAX_HEADER_SIZE, MAX_ID):
        assert f"`{number}" in section, number
    assert f"`{MAX_COST:.0e}`".replace("+0", "") in section
    assert f"waited for\n{LOCK_TIMEOUT:g} seconds" in section


# -- any file at all: a Config or one ConfigError line -------------------------------------

_LEAF = (st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=6)
         | st.sampled_from([URL, "5m", "web", "tcp:1", "gpu", "exclusive"]))
_KEYS = st.text(max_size=5) | st.sampled_from(
    ["url", "command", "health", "path", "tcp", "interval", "instances", "cost", "group", "exclusive",
     "min_residency", "tokens", "name", "token_sha256", "idle_timeout", "queue_limit", "depends_on", "env"])
_VALUE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
                      max_leaves=10)
_SERVICE = st.dictionaries(
    st.sampled_from(["url", "command", "health", "instances", "group", "depends_on", "idle_timeout", "queue_limit",
                     "env", "keep_warm", "on_cold", "strategy", "route_by", "targets", "hosts", "docker"]),
    _VALUE, max_size=4)
DOCUMENTS = st.fixed_dictionaries({}, optional={
    "server": st.dictionaries(st.sampled_from(["listen", "state_path", "shutdown_timeout", "max_body_size",
                                               "header_timeout", "max_backend_connections"]), _VALUE, max_size=3),
    "services": st.dictionaries(st.sampled_from(["web", "gpu", "a-b", 1, True, "x\ny"]), _SERVICE, max_size=3),
    "groups": _VALUE, "auth": _VALUE, "defaults": _VALUE,
})


@settings(max_examples=400, deadline=None)
@given(DOCUMENTS)
def test_any_document_is_a_config_or_one_config_error(document: dict[str, Any]) -> None:
    try:
        parse_auth(parse_config(document, "hestia_config.yml", {}), {})
    except ConfigError as error:
        assert "\n" not in str(error) and str(error).startswith("hestia_config.yml: ")


_PIECES = st.sampled_from([
    *"services:web{}[]&*!<>|-?#'\"\n\t ,.:1ya%@`\\",
    "\xff", "\x00", "url: http://h:1", "!!python/object:os.system", "<<: *a", "&a ", "!!binary x",
    "!!timestamp 2001-01-01", "!!int x", "\u00e9", "\ufeff", "[" * 50, "auth:", "auth: {}",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=40).map("".join))
def test_any_file_is_a_config_or_one_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("any") / "hestia_config.yml"
    # "\xff" stands for a raw byte: the file need not be UTF-8 at all.
    path.write_bytes(text.encode("utf-8").replace("\xff".encode(), b"\xff"))
    try:
        load_config(str(path), {})
    except ConfigError as error:
        assert "\n" not in str(error) and str(error).startswith(f"{path}: ")


# -- a bad value from the environment names its variable (found following the README, round 26) --


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("WEB_IDLE_TIMEOUT", "soon", "services.web.idle_timeout"),
    ("WEB_URL", "localhost:8765", "services.web.url"),
    ("WEB_KEEP_WARM", "maybe", "services.web.keep_warm"),
])
def test_a_bad_value_from_the_environment_names_its_variable(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"services": {"web": {"url": "http://127.0.0.1:1", "command": ["serve"]}}}, "hestia.yml",
                     environ={variable: value})
    assert raised.value.key == key and raised.value.message.endswith(f"(from ${variable})")
    assert "\n" not in str(raised.value)


def test_a_bad_value_written_in_the_file_names_no_variable() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"services": {"web": {"url": "http://127.0.0.1:1", "idle_timeout": "soon"}}}, "hestia.yml",
                     environ={"WEB_URL": "http://127.0.0.1:2"})
    assert raised.value.key == "services.web.idle_timeout" and "(from $" not in str(raised.value)


def test_a_bad_hestia_listen_is_blamed_on_the_variable_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "hestia.yml"
    path.write_text("services:\n  web: {url: 'http://127.0.0.1:1'}\n")
    with pytest.raises(ConfigError) as raised:
        load_checked(str(path), environ={"HESTIA_LISTEN": "8081"})
    assert str(raised.value).startswith("$HESTIA_LISTEN: not a listening endpoint")


def test_the_shipped_ollama_binds_where_its_url_says_whatever_the_shell_exported() -> None:
    """README: `export OLLAMA_HOST=http://localhost:8080/services/ollama` is for clients; a Hestia started
    from that shell passes its environment on, and `ollama serve` binds to OLLAMA_HOST."""
    root = Path(__file__).resolve().parents[1]
    config = load_config(str(root / "hestia_config.yml"),
                         environ={"OLLAMA_HOST": "http://localhost:8080/services/ollama"})
    ollama = config.services["ollama"]
    assert "http://" + ollama.env["OLLAMA_HOST"] == ollama.url
