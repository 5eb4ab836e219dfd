"""
Authentication rules that mutation testing (issue 21) found covered only by process tests:
write_denied, authorize_service and AdminGuard, in memory with DummyRequest and a Clock; and
the auth: section's validation and the guessing limit's edges.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from hestia.auth import (
    AdminGuard,
    AuthConfig,
    Authenticator,
    Denied,
    authorize_service,
    credential_headers,
    is_open_route,
    parse_auth,
    write_denied,
)
from hestia.config import ConfigError
from hestia.loader import parse_config
from hestia.records import credentials_of

pytestmark = pytest.mark.unit

ADMIN = "admin-secret-token"
USER = "user-secret-token"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def auth_config(max_failures: int = 2, window: float = 60, **services: Any) -> AuthConfig:
    services = services or {"app": {"url": "http://127.0.0.1:1"},
                            "keys": {"url": "http://127.0.0.1:2", "pass_authorization": True}}
    config = parse_config({
        "services": services,
        "auth": {"tokens": [{"name": "root", "token_sha256": sha(ADMIN), "scopes": ["admin"]},
                            {"name": "user", "token_sha256": sha(USER), "services": ["app", "keys"]}],
                 "max_failures": max_failures, "failure_window": window},
    }, "hestia_config.yml", {})
    return parse_auth(config, {})


def request(postpath: list[bytes] | None = None, method: bytes = b"GET", client: str = "10.0.0.1",
            **headers: str) -> DummyRequest:
    made = DummyRequest(postpath or [])
    made.method = method
    made.path = b"/v1/" + b"/".join(postpath or [])
    made.client = type("Address", (), {"host": client})()
    made.getClientAddress = lambda: made.client  # type: ignore[method-assign]
    for name, value in headers.items():
        made.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return made


def body(made: DummyRequest) -> dict[str, Any]:
    assert made.finished == 1
    data = b"".join(made.written)
    assert made.responseHeaders.getRawHeaders(b"content-length") == [str(len(data)).encode()]
    assert made.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    decoded: dict[str, Any] = json.loads(data)
    return decoded


# -- write_denied -----------------------------------------------------------------------


def test_write_denied_401_asks_for_a_bearer_token() -> None:
    made = request()
    write_denied(made, Denied(401, "authentication required"), "app")
    assert made.responseCode == 401
    assert made.responseHeaders.getRawHeaders(b"www-authenticate") == [b'Bearer realm="hestia"']
    assert made.responseHeaders.getRawHeaders(b"retry-after") is None
    assert body(made) == {"error": "authentication required", "service": "app", "state": None}


def test_write_denied_429_says_when_to_retry_in_whole_seconds_at_least_one() -> None:
    made = request()
    write_denied(made, Denied(429, "slow down", 12.6))
    assert made.responseCode == 429
    assert made.responseHeaders.getRawHeaders(b"www-authenticate") is None
    assert made.responseHeaders.getRawHeaders(b"retry-after") == [b"13"]
    assert body(made) == {"error": "slow down", "service": None, "state": None, "retry_after": 13}

    soon = request()
    write_denied(soon, Denied(429, "slow down", 0.2))
    assert soon.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    assert body(soon)["retry_after"] == 1


def test_write_denied_403_has_no_challenge() -> None:
    made = request()
    write_denied(made, Denied(403, "token 'user' does not grant the management API"))
    assert made.responseCode == 403
    assert made.responseHeaders.getRawHeaders(b"www-authenticate") is None
    assert body(made)["error"] == "token 'user' does not grant the management API"


# -- authorize_service ----------------------------------------------------------------------


class Site:
    def __init__(self, authenticator: Authenticator | None) -> None:
        self.authenticator = authenticator


def test_authorize_service_without_an_authenticator_strips_only_hestias_header() -> None:
    made = request(X_Hestia_Token="x")
    assert authorize_service(made, "app") is True
    assert credentials_of(made).consumed == frozenset({b"x-hestia-token"})
    assert made.written == [] and not made.finished


def test_authorize_service_lets_a_good_token_through_and_names_it() -> None:
    made = request(Authorization=f"Bearer {USER}")
    made.site = Site(Authenticator(auth_config(), Clock().seconds))
    assert authorize_service(made, "app") is True
    assert credentials_of(made).token_name == "user"
    assert credentials_of(made).consumed == frozenset({b"x-hestia-token", b"authorization"})
    assert made.written == []


def test_authorize_service_writes_the_refusal() -> None:
    made = request()
    made.site = Site(Authenticator(auth_config(), Clock().seconds))
    assert authorize_service(made, "app") is False
    assert made.responseCode == 401
    refusal = body(made)
    assert refusal["service"] == "app" and "Authorization: Bearer" in refusal["error"]


def test_a_service_receiving_its_clients_authorization_takes_only_the_hestia_header() -> None:
    authenticator = Authenticator(auth_config(), Clock().seconds)
    bearer = request(Authorization=f"Bearer {USER}")
    denied = authenticator.check_service(bearer, "keys")
    assert denied is not None and denied.status == 401 and "send X-Hestia-Token" in denied.reason
    assert "Bearer" not in denied.reason
    good = request(Authorization="Bearer sk-client-own", X_Hestia_Token=f" {USER} ")
    assert authenticator.check_service(good, "keys") is None
    assert credentials_of(good).consumed == frozenset({b"x-hestia-token"})


def test_credentials_to_strip() -> None:
    assert credential_headers(False, False) == {b"x-hestia-token"}
    assert credential_headers(False, True) == {b"x-hestia-token"}
    assert credential_headers(True, True) == {b"x-hestia-token"}
    assert credential_headers(True, False) == {b"x-hestia-token", b"authorization"}


def test_auth_off_lets_everything_through() -> None:
    authenticator = Authenticator(AuthConfig(), Clock().seconds)
    assert not authenticator.enabled
    made = request()
    assert authenticator.check_service(made, "app") is None
    assert credentials_of(made).consumed == {b"x-hestia-token"}
    assert authenticator.check_admin(request()) is None


def test_update_swaps_the_tokens_and_keeps_the_failures() -> None:
    clock = Clock()
    authenticator = Authenticator(auth_config(max_failures=1), clock.seconds)
    assert authenticator.check_admin(request(X_Hestia_Token="guess")).status == 401  # type: ignore[union-attr]
    authenticator.update(auth_config(max_failures=1))
    assert authenticator.check_admin(request(X_Hestia_Token=ADMIN)).status == 429  # type: ignore[union-attr]
    authenticator.update(AuthConfig())
    assert authenticator.check_admin(request()) is None


# -- AdminGuard -------------------------------------------------------------------------------


class Api(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[DummyRequest] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(request)
        return b"api"


def guard() -> tuple[AdminGuard, Api]:
    api = Api()
    return AdminGuard(api, Authenticator(auth_config(), Clock().seconds)), api


def test_admin_guard_passes_an_admin_token_to_the_api() -> None:
    admin_guard, api = guard()
    made = request([b"services"], X_Hestia_Token=ADMIN)
    assert admin_guard.render(made) == b"api"
    assert api.seen == [made]


def test_admin_guard_refuses_others_before_the_api_sees_anything() -> None:
    admin_guard, api = guard()
    for made, status in ((request([b"services"]), 401),
                         (request([b"services"], X_Hestia_Token=USER), 403),
                         (request([b"services", b"app", b"stop"], method=b"POST", X_Hestia_Token="x"), 401)):
        assert admin_guard.render(made) is NOT_DONE_YET
        assert made.responseCode == status
        assert body(made)["service"] is None
    assert api.seen == []


def test_admin_guard_leaves_the_open_routes_open() -> None:
    admin_guard, api = guard()
    for path in ([b"health"], [b"openapi.yaml"], [b"ui"], [b"ui", b""], [b"ui", b"app.js"]):
        assert admin_guard.render(request(path)) == b"api"
    assert len(api.seen) == 5
    closed = request([b"health"], method=b"POST")
    assert admin_guard.render(closed) is NOT_DONE_YET and closed.responseCode == 401


@pytest.mark.parametrize(
    ("method", "segments", "is_open"),
    [(b"HEAD", [b"health"], True), (b"GET", [b"ui", b"style.css"], True), (b"GET", [b"ui", b"a.b.c"], False),
     (b"GET", [b"ui", b"../x.js"], False), (b"GET", [b"ui", b"x.js", b""], False), (b"DELETE", [b"ui"], False),
     (b"GET", [b"health", b""], False), (b"GET", [], False), (b"GET", [b"ui", b".js"], False),
     (b"GET", [b"ui", b"APP.JS"], False)],
)
def test_open_route_table(method: bytes, segments: list[bytes], is_open: bool) -> None:
    assert is_open_route(method, segments) is is_open


# -- the guessing limit ---------------------------------------------------------------------


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    authenticator = Authenticator(auth_config(max_failures=2, window=10), clock.seconds)
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    clock.advance(10)  # exactly one window later: the first guess no longer counts
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    assert authenticator.check_admin(request(X_Hestia_Token=ADMIN)) is None
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    limited = authenticator.check_admin(request(X_Hestia_Token=ADMIN))
    assert limited is not None and limited.status == 429 and limited.retry_after == 10
    assert limited.reason.startswith("too many failed authentication attempts")
    clock.advance(9.5)
    limited = authenticator.check_admin(request(X_Hestia_Token=ADMIN))
    assert limited is not None and limited.retry_after == 1.0  # 0.5 s left, floored at one second
    clock.advance(0.5)
    assert authenticator.check_admin(request(X_Hestia_Token=ADMIN)) is None


def test_wrong_and_empty_tokens() -> None:
    authenticator = Authenticator(auth_config(max_failures=5), Clock().seconds)
    wrong = authenticator.check_admin(request(X_Hestia_Token="nope"))
    assert wrong is not None and (wrong.status, wrong.reason) == (401, "invalid token")
    empty = authenticator.check_admin(request(X_Hestia_Token="   "))
    assert empty is not None and empty.status == 401 and empty.reason.startswith("authentication required")
    for header in ("Basic dXNlcg==", "Bearer", f"Bearer {ADMIN} extra"):
        refused = authenticator.check_admin(request(Authorization=header))
        assert refused is not None and refused.status == 401, header
    assert authenticator.check_admin(request(Authorization=f"  BEARER {ADMIN}  ")) is None
    forbidden = authenticator.check_service(request(X_Hestia_Token=USER), "other")
    assert forbidden is not None and forbidden.status == 403
    assert forbidden.reason == "token 'user' does not grant service other"


# -- the auth: section ----------------------------------------------------------------------


def parse(auth: Any, environ: dict[str, str] | None = None) -> AuthConfig:
    config = parse_config({"services": {"app": {"url": "http://127.0.0.1:1"}}, "auth": auth}, "h.yml", {})
    return parse_auth(config, environ or {})


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        ("tokens", "auth"),
        ({"token": []}, "auth.token"),
        ({"tokens": {"a": 1}}, "auth.tokens"),
        ({"tokens": ["x"]}, "auth.tokens[0]"),
        ({"tokens": [{"name": "", "token_sha256": "a" * 64, "scopes": ["admin"]}]}, "auth.tokens[0].name"),
        ({"tokens": [{"name": "a", "token_sha256": "a" * 64, "token_env": "X", "scopes": ["admin"]}]}, "auth.tokens.a"),
        ({"tokens": [{"name": "a", "scopes": ["admin"]}]}, "auth.tokens.a"),
        ({"tokens": [{"name": "a", "token_env": "", "scopes": ["admin"]}]}, "auth.tokens.a.token_env"),
        ({"tokens": [{"name": "a", "token_sha256": "a" * 64, "scopes": "admin"}]}, "auth.tokens.a.scopes"),
        ({"tokens": [{"name": "a", "token_sha256": "a" * 64, "services": [1]}]}, "auth.tokens.a.services"),
        ({"tokens": [{"name": "a", "token_sha256": "a" * 64, "scopes": ["admin"]},
                     {"name": "a", "token_sha256": "b" * 64, "scopes": ["admin"]}]}, "auth.tokens"),
        ({"tokens": [{"name": "a", "token_sha256": "a" * 64, "scopes": ["admin"]},
                     {"name": "b", "token_sha256": "A" * 64, "scopes": ["admin"]}]}, "auth.tokens.b"),
        ({"tokens": [], "max_failures": 0}, "auth.max_failures"),
        ({"tokens": [], "max_failures": True}, "auth.max_failures"),
        ({"tokens": [], "failure_window": 0}, "auth.failure_window"),
        ({"tokens": [], "failure_window": True}, "auth.failure_window"),
    ],
)
def test_bad_auth_sections(auth: Any, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(auth)
    assert caught.value.key == key
    assert str(caught.value).startswith("h.yml: ")


def test_good_auth_sections(tmp_path: Path) -> None:
    assert not parse({"tokens": []}).enabled and not parse(None).enabled
    parsed = parse({"tokens": [{"name": "a", "token_env": "T", "services": ["app"]}], "max_failures": 1,
                    "failure_window": 0.5}, {"T": " secret \n"})
    assert parsed.enabled and parsed.max_failures == 1 and parsed.failure_window == 0.5
    [token] = parsed.tokens
    assert token.digest == hashlib.sha256(b"secret").digest() and not token.admin
    assert token.may_reach("app") and not token.may_reach("other")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as caught:
        parse({"tokens": [{"name": "a", "token_file": str(empty), "scopes": ["admin"]}]})
    assert caught.value.key == "auth.tokens.a.token_file" and "is empty" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse({"tokens": [{"name": "a", "token_env": "UNSET", "scopes": ["admin"]}]}, {"UNSET": "  "})
    assert caught.value.key == "auth.tokens.a.token_env"
    admin = parse({"tokens": [{"name": "r", "token_sha256": "AB" * 32, "scopes": ["admin"]}]}).tokens[0]
    assert admin.admin and admin.may_reach("anything") and admin.digest == bytes.fromhex("ab" * 32)


def test_the_auth_sections_messages() -> None:
    def message(auth: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            parse(auth)
        return caught.value.message

    assert message({"tokens": [{"scopes": ["admin"]}]}) == "every token needs a name (it is what the log shows)"
    assert message({"tokens": [{"name": "a", "scopes": ["admin"]}]}) == (
        "give exactly one of token_env, token_file, token_sha256")
    assert message({"tokens": [{"name": "a", "token_env": "", "scopes": ["admin"]}]}) == "expected a non-empty string"
    assert message({"tokens": [{"name": "a", "token_sha256": "a" * 64, "scopes": "admin"}]}) == (
        "expected a list of names")


def test_a_wrong_token_is_logged_with_the_client_and_never_the_token() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        Authenticator(auth_config(), Clock().seconds).check_admin(request(X_Hestia_Token="guess-123"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    lines = [formatEvent(event) for event in logged]
    assert "wrong token from 10.0.0.1 for the management API" in lines
    assert not any("guess-123" in line for line in lines)
