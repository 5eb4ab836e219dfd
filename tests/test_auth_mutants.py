"""
Authentication rules that mutation testing (issue 21) found covered only by process tests:
write_denied, Authenticator.check_service and AdminGuard, in memory with DummyRequest and a Clock; and
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


# -- check_service: the decision the proxy acts on -------------------------------------------


def test_with_authentication_off_every_request_passes_and_only_hestias_header_is_stripped() -> None:
    made = request(X_Hestia_Token="x")
    assert Authenticator(AuthConfig(), Clock().seconds).check_service(made, "app") is None
    assert credentials_of(made).consumed == frozenset({b"x-hestia-token"})
    assert credentials_of(made).may_see_output  # nothing to hide when nobody is authenticated
    assert made.written == [] and not made.finished


def test_a_good_token_passes_is_named_and_both_credential_headers_are_stripped() -> None:
    made = request(Authorization=f"Bearer {USER}")
    assert Authenticator(auth_config(), Clock().seconds).check_service(made, "app") is None
    assert credentials_of(made).token_name == "user"
    assert credentials_of(made).consumed == frozenset({b"x-hestia-token", b"authorization"})
    assert not credentials_of(made).may_see_output  # a service's output is for admin tokens only
    assert made.written == []


def test_a_request_without_a_token_is_refused_with_how_to_send_one_and_nothing_is_written() -> None:
    made = request()
    denied = Authenticator(auth_config(), Clock().seconds).check_service(made, "app")
    assert denied is not None and denied.status == 401 and "Authorization: Bearer" in denied.reason
    assert made.written == []  # the proxy writes it (with write_denied), the authenticator decides
    assert not credentials_of(made).may_see_output


def test_an_admin_token_may_see_a_services_output() -> None:
    made = request(Authorization=f"Bearer {ADMIN}")
    assert Authenticator(auth_config(), Clock().seconds).check_service(made, "app") is None
    assert credentials_of(made).may_see_output


def test_a_request_the_authenticator_never_saw_may_not_see_output() -> None:
    assert not credentials_of(request()).may_see_output


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


# -- issue 21, seed 11 survivors: the decision cache, the guard's 400, the guessers' table ----------


def test_a_request_checked_twice_for_the_same_scope_counts_one_wrong_token() -> None:
    authenticator = Authenticator(auth_config(max_failures=2), Clock().seconds)
    twice = request(X_Hestia_Token="guess")
    for _ in range(2):  # the channel asks from the head, the resource again when it renders
        denied = authenticator.check_admin(twice)
        assert denied is not None and (denied.status, denied.reason) == (401, "invalid token")
    second = authenticator.check_admin(request(X_Hestia_Token="guess"))
    assert second is not None and second.status == 401  # only the second failure, not yet limited
    limited = authenticator.check_admin(request(X_Hestia_Token=ADMIN))
    assert limited is not None and limited.status == 429


def test_a_cached_decision_answers_the_same_and_another_scope_is_decided_again() -> None:
    authenticator = Authenticator(auth_config(), Clock().seconds)
    made = request(X_Hestia_Token=USER)
    forbidden = authenticator.check_admin(made)
    assert forbidden is not None and forbidden.status == 403
    again = authenticator.check_admin(made)
    assert again is not None and (again.status, again.reason) == (403, forbidden.reason)
    assert authenticator.check_service(made, "app") is None  # another scope: decided afresh
    assert authenticator.check_service(made, "app") is None  # and a granted decision stays granted
    assert credentials_of(made).token_name == "user" and credentials_of(made).admin is False
    admin = request(X_Hestia_Token=ADMIN)
    assert authenticator.check_admin(admin) is None and authenticator.check_admin(admin) is None
    assert credentials_of(admin).admin is True


def test_a_limited_client_is_told_to_slow_down_even_without_a_token() -> None:
    authenticator = Authenticator(auth_config(max_failures=1), Clock().seconds)
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    limited = authenticator.check_admin(request())
    assert limited is not None and limited.status == 429
    assert limited.reason == "too many failed authentication attempts: slow down"
    assert authenticator.check_admin(request(client="10.0.0.2")).status == 401  # type: ignore[union-attr]


def test_a_forbidden_token_is_logged_by_name_and_scope() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        Authenticator(auth_config(), Clock().seconds).check_admin(request(X_Hestia_Token=USER))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert "token user may not reach the management API" in [formatEvent(event) for event in logged]


def test_admin_guard_refuses_a_path_that_is_not_utf8_in_json() -> None:
    admin_guard, api = guard()
    made = request([b"services"], X_Hestia_Token=ADMIN)
    made.path = b"/v1/services/%ff"
    assert admin_guard.render(made) is NOT_DONE_YET
    assert made.responseCode == 400
    assert body(made) == {"error": "the path is not percent-encoded UTF-8", "service": None, "state": None}
    assert api.seen == []


def test_admin_guard_with_no_postpath_asks_for_a_token() -> None:
    admin_guard, api = guard()
    made = request()
    made.postpath = None
    assert admin_guard.render(made) is NOT_DONE_YET and made.responseCode == 401
    assert admin_guard.check_head(request(X_Hestia_Token=USER)).status == 403  # type: ignore[union-attr]
    assert api.seen == []


def test_a_full_table_of_guessers_forgets_the_oldest_client_first() -> None:
    from hestia import auth

    clock = Clock()
    authenticator = Authenticator(auth_config(max_failures=1), clock.seconds)
    for index in range(auth._MAX_TRACKED_CLIENTS):
        authenticator.check_admin(request(X_Hestia_Token="guess", client=f"c{index}"))
    assert authenticator.check_admin(request(X_Hestia_Token=ADMIN, client="c0")).status == 429  # type: ignore[union-attr]
    authenticator.check_admin(request(X_Hestia_Token="guess", client="newcomer"))
    assert authenticator.check_admin(request(X_Hestia_Token=ADMIN, client="c0")) is None  # dropped
    for client in ("c1", f"c{auth._MAX_TRACKED_CLIENTS - 1}", "newcomer"):
        assert authenticator.check_admin(request(X_Hestia_Token=ADMIN, client=client)).status == 429  # type: ignore[union-attr]


def test_a_client_limited_once_stays_limited_to_the_configured_count() -> None:
    clock = Clock()
    authenticator = Authenticator(auth_config(max_failures=2, window=10), clock.seconds)
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    clock.advance(1)
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    clock.advance(9)  # the first guess is out of the window, the second is not
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    limited = authenticator.check_admin(request(X_Hestia_Token=ADMIN))
    assert limited is not None and limited.status == 429 and limited.retry_after == 1


def test_a_reload_that_raises_max_failures_still_limits_a_known_guesser() -> None:
    """
    A client's failure history was a deque bounded by the max_failures of when it was made:
    after a reload raising the limit, a known guesser could never reach it (fixed in 31e096c).
    """
    clock = Clock()
    authenticator = Authenticator(auth_config(max_failures=1), clock.seconds)
    authenticator.check_admin(request(X_Hestia_Token="guess"))
    authenticator.update(auth_config(max_failures=3))
    for _ in range(2):
        clock.advance(1)
        authenticator.check_admin(request(X_Hestia_Token="guess"))
    limited = authenticator.check_admin(request(X_Hestia_Token=ADMIN))
    assert limited is not None and limited.status == 429


# -- secret_variables ---------------------------------------------------------------------------


def test_secret_variables_are_the_token_variables_and_semaphores() -> None:
    from hestia.auth import secret_variables

    def names(sections: dict[str, Any]) -> frozenset[str]:
        return secret_variables(type("Config", (), {"sections": sections})())  # type: ignore[arg-type]

    assert names({}) == frozenset()
    assert names({"auth": {"tokens": [{"name": "a", "token_env": "A_TOKEN"}, {"name": "b", "token_sha256": "x"},
                                      "junk", {"name": "c", "token_env": 3}, {"token_env": "C_TOKEN"}]}}) == {
        "A_TOKEN", "C_TOKEN"}
    assert names({"auth": {"tokens": "A_TOKEN"}}) == frozenset()
    assert names({"auth": ["A_TOKEN"]}) == frozenset()
    assert names({"semaphore": {"url": "http://s"}}) == {"SEMAPHORE_API_TOKEN"}
    assert names({"semaphore": {"token_env": "SEM"}, "auth": {"tokens": [{"token_env": "T"}]}}) == {
        "SEMAPHORE_API_TOKEN", "SEM", "T"}
    assert names({"semaphore": {"token_env": 5}}) == {"SEMAPHORE_API_TOKEN"}
    assert names({"semaphore": "SEM"}) == frozenset()


def test_secret_variables_of_a_parsed_configuration() -> None:
    from hestia.auth import secret_variables

    config = parse_config({"services": {"app": {"url": "http://127.0.0.1:1"}},
                           "auth": {"tokens": [{"name": "a", "token_env": "HESTIA_A", "scopes": ["admin"]}]}},
                          "h.yml", {})
    assert secret_variables(config) == {"HESTIA_A"}
