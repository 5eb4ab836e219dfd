"""
Issue 6, authentication: token configuration, the checks, and the access matrix.

Unit tests parse configurations and drive L{Authenticator} with a L{Clock}; a
Hypothesis property checks that a routed request never forwards a credential or
hop-by-hop header; the matrix runs every C{/v1} route and a proxied service on
a real Hestia with no token, a wrong one, another scope's and the right one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.hestiaproc import BackendSpec, HestiaProcess, reap_leftovers, wait_for
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from hestia.auth import Authenticator, credential_headers, digest, is_open_route, parse_auth
from hestia.config import ConfigError
from hestia.headers import HOP_BY_HOP, PathEscape, headers_for_backend, split_service_path
from hestia.loader import parse_config
from hestia.records import credentials_of

ADMIN, LAPTOP, CI = "admin-secret-1", "laptop-secret-2", "ci-secret-3"


def config(auth: Any, **services: Any) -> Any:
    services = services or {"ollama": {"url": "http://127.0.0.1:1"}, "web": {"url": "http://127.0.0.1:2"}}
    return parse_config({"services": services, "auth": auth}, "hestia_config.yml", {})


def tokens(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "laptop.token").write_text(LAPTOP + "\n")
    return {
        "tokens": [
            {"name": "admin", "token_env": "T_ADMIN", "scopes": ["admin"]},
            {"name": "laptop", "token_file": str(tmp_path / "laptop.token"), "services": ["ollama"]},
            {"name": "ci", "token_sha256": hashlib.sha256(CI.encode()).hexdigest(), "services": ["ollama", "web"]},
        ],
        "max_failures": 3,
        "failure_window": 60,
    }


# -- configuration ---------------------------------------------------------------------


@pytest.mark.unit
def test_tokens_from_env_file_and_digest(tmp_path: Path) -> None:
    auth = parse_auth(config(tokens(tmp_path)), {"T_ADMIN": ADMIN})
    assert auth.enabled
    by_name = {token.name: token for token in auth.tokens}
    assert by_name["admin"].digest == digest(ADMIN) and by_name["admin"].admin
    assert by_name["laptop"].digest == digest(LAPTOP)  # the file's newline is not part of it
    assert by_name["ci"].services == {"ollama", "web"} and not by_name["ci"].admin
    assert not parse_auth(config(None)).enabled


@pytest.mark.unit
@pytest.mark.parametrize(
    "entry, key, words",
    [
        ({"name": "x", "token": "plain", "scopes": ["admin"]}, "auth.tokens.x.token", "plain-text"),
        ({"name": "x", "token_env": "NOPE", "scopes": ["admin"]}, "auth.tokens.x.token_env", "NOPE is not set"),
        ({"name": "x", "token_file": "/nonexistent/t", "scopes": ["admin"]}, "auth.tokens.x.token_file", "cannot read"),
        ({"name": "x", "token_sha256": "abc", "scopes": ["admin"]}, "auth.tokens.x.token_sha256", "64 hexadecimal"),
        ({"name": "x", "token_sha256": "a" * 64, "services": ["ghost"]}, "auth.tokens.x.services", "ghost"),
        ({"name": "x", "token_sha256": "a" * 64, "scopes": ["root"]}, "auth.tokens.x.scopes", "unknown scope"),
        ({"name": "x", "token_sha256": "a" * 64}, "auth.tokens.x", "grants nothing"),
        ({"token_sha256": "a" * 64, "scopes": ["admin"]}, "auth.tokens[0].name", "needs a name"),
    ],
)
def test_config_errors_name_the_key_and_never_the_token(entry: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_auth(config({"tokens": [entry]}), {})
    assert raised.value.key == key and words in str(raised.value)
    assert str(raised.value).startswith("hestia_config.yml: ")


# -- the checks, with a Clock ---------------------------------------------------------


def request(path: bytes = b"/services/ollama/x", client: str = "10.0.0.1", **headers: str) -> DummyRequest:
    made = DummyRequest(path.split(b"/")[1:])
    made.uri = path
    made.client = type("Address", (), {"host": client})()
    made.getClientAddress = lambda: made.client  # type: ignore[method-assign]
    for name, value in headers.items():
        made.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return made


@pytest.fixture
def authenticator(tmp_path: Path) -> tuple[Authenticator, Clock]:
    clock = Clock()
    loaded = parse_config(
        {"services": {"ollama": {"url": "http://127.0.0.1:1"}, "web": {"url": "http://127.0.0.1:2",
                                                                       "pass_authorization": True}},
         "auth": tokens(tmp_path)},
        "hestia_config.yml", {},
    )
    return Authenticator(parse_auth(loaded, {"T_ADMIN": ADMIN}), clock.seconds), clock


@pytest.mark.unit
def test_scopes(authenticator: tuple[Authenticator, Clock]) -> None:
    auth, _ = authenticator
    assert auth.check_service(request(Authorization=f"Bearer {LAPTOP}"), "ollama") is None
    assert auth.check_service(request(X_Hestia_Token=LAPTOP), "ollama") is None
    denied = auth.check_service(request(Authorization=f"Bearer {LAPTOP}"), "web")
    assert denied is not None and denied.status == 401  # web takes only X-Hestia-Token
    denied = auth.check_service(request(X_Hestia_Token=LAPTOP), "web")
    assert denied is not None and denied.status == 403
    assert auth.check_service(request(X_Hestia_Token=ADMIN), "web") is None
    denied = auth.check_admin(request(Authorization=f"Bearer {CI}"))
    assert denied is not None and denied.status == 403
    assert auth.check_admin(request(Authorization=f"bearer  {ADMIN}")) is None


@pytest.mark.unit
def test_consumed_credentials_are_marked_for_stripping(authenticator: tuple[Authenticator, Clock]) -> None:
    auth, _ = authenticator
    checked = request(Authorization=f"Bearer {CI}")
    auth.check_service(checked, "ollama")
    assert credentials_of(checked).consumed == {b"authorization", b"x-hestia-token"}
    passing = request(Authorization="Bearer sk-openai-key", X_Hestia_Token=CI)
    assert auth.check_service(passing, "web") is None
    assert credentials_of(passing).consumed == {b"x-hestia-token"}


@pytest.mark.unit
def test_repeated_failures_are_slowed_down_per_client(authenticator: tuple[Authenticator, Clock]) -> None:
    auth, clock = authenticator
    for _ in range(3):
        denied = auth.check_service(request(X_Hestia_Token="guess"), "ollama")
        assert denied is not None and denied.status == 401
        clock.advance(1)
    limited = auth.check_service(request(X_Hestia_Token=LAPTOP), "ollama")
    assert limited is not None and limited.status == 429
    assert limited.retry_after == pytest.approx(57)
    # Another client is not affected; missing tokens do not count as guesses.
    assert auth.check_service(request(client="10.0.0.2", X_Hestia_Token=LAPTOP), "ollama") is None
    for _ in range(10):
        missing = auth.check_service(request(client="10.0.0.3"), "ollama")
        assert missing is not None and missing.status == 401
    clock.advance(57)
    assert auth.check_service(request(X_Hestia_Token=LAPTOP), "ollama") is None


@pytest.mark.unit
def test_open_routes_are_exact() -> None:
    assert is_open_route(b"GET", [b"health"])
    assert is_open_route(b"GET", [b"ui", b"app.js"])
    for method, segments in [(b"POST", [b"health"]), (b"GET", [b"health", b""]), (b"GET", [b"", b"health"]),
                             (b"GET", [b"services"]), (b"GET", [b"ui", b"..%2fservices"]),
                             (b"GET", [b"health", b"..", b"services"])]:
        assert not is_open_route(method, segments), (method, segments)


# -- property: routing and forwarded headers --------------------------------------------

name_strategy = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,8}\Z")
rest_strategy = st.lists(
    st.sampled_from(["a", "..", ".", "%2e%2e", "%2E.", "%2f", "%252e%252e", "\\", "..\\", "v1", "services", "%5c",
                     "?", "=", "&", "x y", "%00", "//"]),
    max_size=8,
).map(lambda parts: "/".join(parts).encode())
credential_or_hop = st.sampled_from(
    [b"Authorization", b"X-Hestia-Token", b"x-hestia-token", b"AUTHORIZATION", *[n.title() for n in HOP_BY_HOP]]
)
plain_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10).map(str.encode)
header_values = st.lists(st.binary(max_size=12).filter(lambda v: b"\r" not in v and b"\n" not in v),
                         min_size=1, max_size=2)
request_headers = st.lists(st.tuples(st.one_of(credential_or_hop, plain_name), header_values), max_size=10)


@pytest.mark.unit
@given(name_strategy, rest_strategy, request_headers, st.booleans(), st.booleans())
def test_routing_stays_in_the_service_and_no_credential_is_forwarded(
    name: str, rest: bytes, headers: list[tuple[bytes, list[bytes]]], enabled: bool, passing: bool
) -> None:
    uri = b"/services/" + name.encode() + b"/" + rest
    try:
        routed = split_service_path(uri)
    except PathEscape:
        return
    assert routed is not None and routed[0] == name
    assert uri.endswith(routed[1]) and routed[1].startswith(b"/")
    path = routed[1].split(b"?", 1)[0]
    assert b".." not in path.replace(b"\\", b"/").split(b"/")

    consumed = credential_headers(enabled, passing)
    forwarded = {
        header.lower()
        for header, _ in headers_for_backend(
            headers, client_ip="10.0.0.1", scheme=b"http", host=b"gw", prefix=b"/services/" + name.encode(),
            request_id=b"rid", drop=consumed,
        )
    }
    assert not forwarded & HOP_BY_HOP
    assert b"x-hestia-token" not in forwarded
    if enabled and not passing:
        assert b"authorization" not in forwarded


# -- the matrix on a real Hestia -------------------------------------------------------


class Matrix:
    def __init__(self, hestia: HestiaProcess, echo: BackendSpec) -> None:
        self.hestia = hestia
        self.echo = echo
        self.http = httpx.Client(base_url=hestia.url, trust_env=False, timeout=15.0)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    tmp = tmp_path_factory.mktemp("auth")
    echo = BackendSpec("echo", tmp)
    openai = BackendSpec("openai", tmp)
    auth = {
        "tokens": [
            {"name": "admin", "token_env": "T_ADMIN", "scopes": ["admin"]},
            {"name": "laptop", "token_file": str(tmp / "laptop.token"), "services": ["echo", "openai"]},
            {"name": "other", "token_sha256": hashlib.sha256(CI.encode()).hexdigest(), "services": ["openai"]},
        ],
        "max_failures": 1000,
    }
    (tmp / "laptop.token").write_text(LAPTOP)
    hestia = HestiaProcess(
        {"defaults": {"idle_timeout": 0},
         "services": {"echo": echo.service(), "openai": openai.service(pass_authorization=True)},
         "auth": auth},
        tmp / "hestia", env={"T_ADMIN": ADMIN},
    ).start()
    result = Matrix(hestia, echo)
    try:
        yield result
    finally:
        result.http.close()
        hestia.stop()
        wait_for(lambda: not echo.running() and not openai.running(), 5.0)
        reap_leftovers(str(tmp))


NO, WRONG, OTHER = {}, {"Authorization": "Bearer not-a-token"}, {"X-Hestia-Token": CI}
V1_ROUTES = [
    ("GET", "/v1/services"),
    ("GET", "/v1/services/echo/status"),
    ("GET", "/v1/services/echo/events"),
    ("GET", "/v1/services/echo/logs?tail=5"),
    ("GET", "/v1/metrics"),
    ("POST", "/v1/services/echo/start"),
    ("POST", "/v1/services/echo/stop"),
    ("POST", "/v1/services/echo/restart"),
    ("POST", "/v1/reload"),
    ("GET", "/v1/no-such-route"),
]


@pytest.mark.integration
def test_health_is_open(matrix: Matrix) -> None:
    for headers in (NO, WRONG, OTHER):
        assert matrix.http.get("/v1/health", headers=headers).status_code == 200


@pytest.mark.integration
@pytest.mark.parametrize("method, path", V1_ROUTES)
def test_v1_route_matrix(matrix: Matrix, method: str, path: str) -> None:
    for headers, status in ((NO, 401), (WRONG, 401), (OTHER, 403)):
        response = matrix.http.request(method, path, headers=headers)
        assert response.status_code == status, (headers, response.text)
        assert response.headers["content-type"] == "application/json"
        assert "error" in response.json()
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert CI not in response.text and "not-a-token" not in response.text
    right = matrix.http.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"})
    assert right.status_code not in (401, 403, 429), right.text
    expected = 404 if path == "/v1/no-such-route" else (202, 200)
    assert right.status_code in (expected if isinstance(expected, tuple) else (expected,)), right.text


@pytest.mark.integration
def test_proxied_service_matrix(matrix: Matrix) -> None:
    before = len(matrix.echo.requests())
    for headers, status in ((NO, 401), (WRONG, 401), (OTHER, 403)):
        response = matrix.http.get("/services/echo/echo", headers=headers)
        assert response.status_code == status, response.text
        assert response.json()["service"] == "echo"
    assert len(matrix.echo.requests()) == before  # nothing reached (or started) the backend
    for headers in ({"Authorization": f"Bearer {LAPTOP}"}, {"X-Hestia-Token": LAPTOP},
                    {"Authorization": f"Bearer {ADMIN}"}):
        response = matrix.http.get("/services/echo/echo", headers=headers)
        assert response.status_code == 200, response.text
        sent = {name.lower(): value for name, value in response.json()["headers"]}
        assert "authorization" not in sent and "x-hestia-token" not in sent
    log = matrix.hestia.log_text()
    for secret in (ADMIN, LAPTOP, CI):
        assert secret not in log


@pytest.mark.integration
def test_pass_authorization_forwards_the_clients_own_key(matrix: Matrix) -> None:
    response = matrix.http.get("/services/openai/echo",
                               headers={"Authorization": "Bearer sk-client-key", "X-Hestia-Token": CI})
    assert response.status_code == 200, response.text
    sent = {name.lower(): value for name, value in response.json()["headers"]}
    assert sent["authorization"] == "Bearer sk-client-key"
    assert "x-hestia-token" not in sent
    # Its Authorization is the client's own: it is not taken as a Hestia token.
    refused = matrix.http.get("/services/openai/echo", headers={"Authorization": f"Bearer {ADMIN}"})
    assert refused.status_code == 401
