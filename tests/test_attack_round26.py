"""
Round 26 (issue 15 redesign) attacked from outside: the authenticator passed in,
C{may_see_output}, the C{Upstream}, the C{async def} conversions.

Each finding is a strict xfail whose reason starts with C{finding:}; the other
tests pin what held (security properties no earlier test pinned).
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.hestiaproc import BackendSpec, HestiaProcess, raw_request, reap_leftovers, wait_for
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hestia.testing import ADMIN_TOKEN, ECHO_TOKEN, MemoryHestia, body_of, statuses

GET = b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n"
SECRET = "token=s3cr3t-output"
BROWSER = b"Accept: text/html\r\nSec-Fetch-Mode: navigate\r\n"


def token(value: str) -> bytes:
    return b"X-Hestia-Token: " + value.encode() + b"\r\n"


def bearer(value: str) -> bytes:
    return b"Authorization: Bearer " + value.encode() + b"\r\n"


def get(hestia: MemoryHestia, path: bytes, headers: bytes = b"", host: bytes = b"gw") -> bytes:
    return hestia.request(GET % (path, host, headers)).received()


def forwarded_headers(hestia: MemoryHestia) -> list[dict[bytes, list[bytes]]]:
    return [{name.lower(): list(values) for name, values in seen.requestHeaders.getAllRawHeaders()}
            for seen in hestia.backend.seen]


# -- host-routed services (hosts:) go through the authenticator -----------------------------------


HOSTED = {"echo": {"url": "http://backend:8000", "hosts": ["echo.example"]},
          "other": {"url": "http://backend:8001", "hosts": ["other.example"]}}


@pytest.mark.unit
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"DELETE"])
def test_a_host_routed_request_without_a_token_is_401_and_never_forwarded(method: bytes) -> None:
    hestia = MemoryHestia(HOSTED, auth=True)
    raw = hestia.request(method + b" /anything HTTP/1.1\r\nHost: echo.example\r\n\r\n").received()
    assert statuses(raw) == [401], raw
    assert hestia.backend.seen == []


@pytest.mark.unit
def test_a_host_routed_request_with_a_token_for_another_service_is_403() -> None:
    hestia = MemoryHestia(HOSTED, auth=True)
    raw = get(hestia, b"/x", token(ECHO_TOKEN), host=b"other.example")
    assert statuses(raw) == [403], raw
    assert hestia.backend.seen == []


@pytest.mark.unit
@pytest.mark.parametrize("credential", [token(ECHO_TOKEN), bearer(ECHO_TOKEN)])
def test_a_host_routed_request_with_its_token_is_forwarded_without_the_token(credential: bytes) -> None:
    hestia = MemoryHestia(HOSTED, auth=True)
    raw = get(hestia, b"/x", credential, host=b"echo.example:8080")
    assert statuses(raw) == [200], raw
    [headers] = forwarded_headers(hestia)
    assert b"x-hestia-token" not in headers and b"authorization" not in headers
    assert ECHO_TOKEN.encode() not in b"".join(value for values in headers.values() for value in values)


@pytest.mark.unit
def test_a_host_routed_body_without_a_token_is_refused_before_it_is_read() -> None:
    hestia = MemoryHestia(HOSTED, auth=True)
    client = hestia.request(b"POST /x HTTP/1.1\r\nHost: echo.example\r\nContent-Length: 100000\r\n\r\n")
    assert statuses(client.received()) == [401], client.received()
    assert hestia.backend.seen == []


@pytest.mark.unit
def test_a_host_routed_upgrade_without_a_token_opens_no_backend_connection() -> None:
    hestia = MemoryHestia(HOSTED, auth=True)
    raw = get(hestia, b"/socket", b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
              host=b"echo.example")
    assert statuses(raw) == [401], raw
    assert hestia.upgrades.connections == []


@pytest.mark.unit
def test_a_host_routed_upgrade_with_a_token_uses_the_upgrade_endpoint_without_the_token() -> None:
    hestia = MemoryHestia(HOSTED, auth=True)
    get(hestia, b"/socket", token(ECHO_TOKEN) + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n", host=b"echo.example")
    [connection] = hestia.upgrades.connections
    sent = connection.sent()
    assert sent.startswith(b"GET /socket HTTP/1.1\r\n"), sent
    assert ECHO_TOKEN.encode() not in sent and b"x-hestia-token" not in sent.lower()


# -- /services/<name> spellings and methods: the authenticator decides every one -----------------------------


@pytest.mark.unit
@pytest.mark.parametrize("path", [b"/services/echo", b"/services/echo?x=1", b"/services/echo/", b"/services/echo/a%2fb",
                                  b"/services/echo//x", b"/services/echo/;x"])
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"PATCH", b"TRACE"])
def test_every_method_and_spelling_needs_a_token(path: bytes, method: bytes) -> None:
    hestia = MemoryHestia(auth=True)
    raw = hestia.request(method + b" " + path + b" HTTP/1.1\r\nHost: gw\r\n\r\n").received()
    assert statuses(raw)[:1] in ([401], [400], [405]), raw
    assert hestia.backend.seen == [] and hestia.upgrades.connections == []


# -- a model route's intercept and passive monitors come after the authenticator ----------------------------


MODELS = {"echo": {"route_by": "model"},
          "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"]},
          "other": {"url": "http://backend:8001"}}


@pytest.mark.unit
@pytest.mark.parametrize("path", [b"/services/echo/v1/models", b"/services/echo/api/tags", b"/services/echo/api/ps"])
def test_a_model_list_needs_a_token(path: bytes) -> None:
    hestia = MemoryHestia(MODELS, auth=True)
    raw = get(hestia, path)
    assert statuses(raw) == [401], raw
    assert b"qwen" not in raw
    assert statuses(get(hestia, path, token(ECHO_TOKEN)))[:1] in ([200], [404])


@pytest.mark.unit
def test_an_unknown_model_is_not_told_to_a_client_without_a_token() -> None:
    hestia = MemoryHestia(MODELS, auth=True)
    raw = hestia.request(b"POST /services/echo/api/chat HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 17\r\n\r\n{\"model\": \"nope\"}").received()
    assert statuses(raw) == [401], raw
    assert b"qwen" not in raw and hestia.fakes["qwen"].starts == []


@pytest.mark.unit
def test_a_passive_monitor_without_a_token_is_401_and_not_told_the_state() -> None:
    hestia = MemoryHestia({"echo": {"url": "http://backend:8000", "command": ["x"]},
                           "other": {"url": "http://backend:8001"}}, auth=True)
    raw = get(hestia, b"/services/echo/health", b"User-Agent: Uptime-Kuma/1.0\r\n")
    assert statuses(raw) == [401], raw
    assert b"stopped" not in raw and b"x-hestia-state" not in raw.lower()


# -- a service's output (detail) and the waiting page --------------------------------------------------------


def _fail_every_start(hestia: MemoryHestia) -> None:
    for _ in range(5):
        hestia.settle()
        for fake in hestia.fakes.values():
            if fake.starts and not fake.starts[-1].called:
                fake.output = [SECRET]
                fake.exit("exit status 1")
    hestia.settle()


INSTANCES = {"echo": {"instances": [{"url": "http://first:1", "command": ["a"]},
                                    {"url": "http://second:2", "command": ["b"]}]},
             "other": {"url": "http://backend:8001"}}
PROCESS = {"echo": {"url": "http://backend:8000", "command": ["x"]}, "other": {"url": "http://backend:8001"}}


@pytest.mark.unit
@pytest.mark.parametrize("services", [PROCESS, INSTANCES], ids=["process", "instances"])
def test_a_failed_starts_output_is_not_in_the_error_to_a_service_token(services: dict[str, Any]) -> None:
    hestia = MemoryHestia(services, auth=True)
    client = hestia.request(GET % (b"/services/echo/x", b"gw", token(ECHO_TOKEN)))
    _fail_every_start(hestia)
    raw = client.received()
    assert statuses(raw) == [502], raw
    assert SECRET.encode() not in raw and b"detail" not in body_of(raw)


@pytest.mark.unit
@pytest.mark.parametrize("services", [PROCESS, INSTANCES], ids=["process", "instances"])
def test_a_failed_starts_output_is_in_the_error_to_an_admin_token(services: dict[str, Any]) -> None:
    hestia = MemoryHestia(services, auth=True)
    client = hestia.request(GET % (b"/services/echo/x", b"gw", token(ADMIN_TOKEN)))
    _fail_every_start(hestia)
    raw = client.received()
    assert statuses(raw) == [502], raw
    assert json.loads(body_of(raw))["detail"] == [SECRET]


def _waiting_page(services: dict[str, Any], credential: bytes) -> bytes:
    hestia = MemoryHestia(services, auth=True)
    first = hestia.request(GET % (b"/services/echo/x", b"gw", token(ADMIN_TOKEN)))
    _fail_every_start(hestia)
    assert statuses(first.received()) == [502]
    raw = get(hestia, b"/services/echo/", credential + BROWSER)
    assert statuses(raw) == [503] and b"x-hestia-waiting: echo" in raw.lower(), raw
    return raw


@pytest.mark.unit
def test_the_waiting_page_shows_a_process_services_output_to_an_admin_only() -> None:
    assert SECRET.encode() not in _waiting_page(PROCESS, token(ECHO_TOKEN))
    assert SECRET.encode() in _waiting_page(PROCESS, token(ADMIN_TOKEN))


@pytest.mark.unit
@pytest.mark.parametrize("host, path", [(b"gw", b"/services/echo/"), (b"echo.example", b"/")])
def test_no_waiting_page_and_no_start_for_a_browser_without_a_token(host: bytes, path: bytes) -> None:
    hestia = MemoryHestia({**PROCESS, "echo": {**PROCESS["echo"], "hosts": ["echo.example"]}}, auth=True)
    raw = get(hestia, path, BROWSER, host=host)
    assert statuses(raw) == [401], raw
    assert b"x-hestia-waiting" not in raw.lower() and b"<html" not in raw.lower()
    assert hestia.fakes["echo"].starts == []

@pytest.mark.unit
def test_the_waiting_page_hides_an_instances_output_from_a_service_token() -> None:
    raw = _waiting_page(INSTANCES, token(ECHO_TOKEN))
    assert SECRET.encode() not in raw, re.findall(rb"last_error_detail[^\]]*\]", raw)


# -- the management API stays admin-only and its open routes tell nothing a service printed -----------------


@pytest.mark.unit
def test_v1_health_without_a_token_holds_no_service_output() -> None:
    hestia = MemoryHestia(PROCESS, auth=True)
    client = hestia.request(GET % (b"/services/echo/x", b"gw", token(ADMIN_TOKEN)))
    _fail_every_start(hestia)
    assert statuses(client.received()) == [502]
    raw = get(hestia, b"/v1/health")
    assert statuses(raw) == [200], raw
    assert SECRET.encode() not in raw


@pytest.mark.unit
@pytest.mark.parametrize("path", [b"/v1/services/echo/status", b"/v1/services/echo/logs", b"/v1/services",
                                  b"/v1/services/echo/events", b"/v1//services/echo/status", b"/v1/health/../services"])
def test_v1_with_a_service_token_is_refused_and_holds_no_output(path: bytes) -> None:
    hestia = MemoryHestia(PROCESS, auth=True)
    client = hestia.request(GET % (b"/services/echo/x", b"gw", token(ADMIN_TOKEN)))
    _fail_every_start(hestia)
    raw = get(hestia, path, token(ECHO_TOKEN))
    assert statuses(raw)[:1] in ([403], [404], [400]), raw
    assert SECRET.encode() not in raw
    assert client.received()


# -- a reload that changes the tokens reaches the proxy resources already built ------------------------------


@pytest.fixture
def daemon_globals() -> Iterator[None]:
    """HestiaService sets the process-wide list of hidden variables: put it back afterwards."""
    from hestia.backends import environment

    saved = set(environment._hidden)
    yield
    environment._hidden.clear()
    environment._hidden.update(saved)


def _daemon_config(path: Any, tokens: list[dict[str, Any]], state: Any, echo: dict[str, Any] | None = None) -> None:
    import yaml

    path.write_text(yaml.safe_dump({
        "server": {"state_path": str(state), "listen": "tcp:0:interface=127.0.0.1"},
        "services": {"echo": {"url": "http://127.0.0.1:9", **(echo or {})}, "other": {"url": "http://127.0.0.1:9"}},
        "auth": {"tokens": tokens},
    }))


def _daemon_request(service: Any, credential: bytes, path: bytes = b"/services/echo/x", host: bytes = b"gw") -> bytes:
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
    protocol = service.site.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    protocol.dataReceived(GET % (path, host, credential))
    raw = bytes(transport.value())
    protocol.connectionLost(Failure(ConnectionDone()))
    return raw


@pytest.mark.unit
def test_a_reload_that_replaces_a_token_takes_effect_on_services_already_served(tmp_path: Any,
                                                                                daemon_globals: None) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from hestia.auth import digest
    from hestia.preflight import load_checked
    from hestia.server_tap import HestiaService

    old, new = "old-token-0123456789", "new-token-0123456789"
    config_file = tmp_path / "hestia.yml"
    _daemon_config(config_file, [{"name": "admin", "token_sha256": digest(ADMIN_TOKEN).hex(), "scopes": ["admin"]},
                                 {"name": "laptop", "token_sha256": digest(old).hex(), "services": ["echo"]}],
                   tmp_path / "state.db")
    service = HestiaService(load_checked(str(config_file)), reactor=MemoryReactorClock())
    # Built and cached before the reload: the proxy resource of echo holds the authenticator.
    assert statuses(_daemon_request(service, token(new))) == [401]
    assert statuses(_daemon_request(service, token(old)))[:1] not in ([401], [403])
    _daemon_config(config_file, [{"name": "admin", "token_sha256": digest(ADMIN_TOKEN).hex(), "scopes": ["admin"]},
                                 {"name": "laptop", "token_sha256": digest(new).hex(), "services": ["other"]}],
                   tmp_path / "state.db")
    service.reload()
    assert statuses(_daemon_request(service, token(old))) == [401]  # the replaced token is refused at once
    assert statuses(_daemon_request(service, token(new))) == [403]  # and the new one's grants are the new ones
    assert statuses(_daemon_request(service, token(new), b"/services/other/x"))[:1] not in ([401], [403])
    assert statuses(_daemon_request(service, token(ECHO_TOKEN), b"/v1/services")) == [401]


@pytest.mark.unit
def test_a_reload_that_turns_auth_off_and_on_again_reaches_the_proxy(tmp_path: Any, daemon_globals: None) -> None:
    import yaml
    from twisted.internet.testing import MemoryReactorClock

    from hestia.auth import digest
    from hestia.preflight import load_checked
    from hestia.server_tap import HestiaService

    config_file = tmp_path / "hestia.yml"
    tokens = [{"name": "admin", "token_sha256": digest(ADMIN_TOKEN).hex(), "scopes": ["admin"]}]
    _daemon_config(config_file, tokens, tmp_path / "state.db")
    service = HestiaService(load_checked(str(config_file)), reactor=MemoryReactorClock())
    assert statuses(_daemon_request(service, b"")) == [401]
    raw = yaml.safe_load(config_file.read_text())
    del raw["auth"]
    config_file.write_text(yaml.safe_dump(raw))
    service.reload()
    assert statuses(_daemon_request(service, b""))[:1] not in ([401], [403])
    _daemon_config(config_file, tokens, tmp_path / "state.db")
    service.reload()
    assert statuses(_daemon_request(service, b"")) == [401]


@pytest.mark.unit
def test_a_reload_that_moves_a_services_hosts_moves_its_authentication_too(tmp_path: Any,
                                                                            daemon_globals: None) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from hestia.auth import digest
    from hestia.preflight import load_checked
    from hestia.server_tap import HestiaService

    config_file = tmp_path / "hestia.yml"
    tokens = [{"name": "admin", "token_sha256": digest(ADMIN_TOKEN).hex(), "scopes": ["admin"]},
              {"name": "echo", "token_sha256": digest(ECHO_TOKEN).hex(), "services": ["echo"]}]
    _daemon_config(config_file, tokens, tmp_path / "state.db", {"hosts": ["old.example"]})
    service = HestiaService(load_checked(str(config_file)), reactor=MemoryReactorClock())
    assert statuses(_daemon_request(service, b"", b"/x", b"old.example")) == [401]
    _daemon_config(config_file, tokens, tmp_path / "state.db", {"hosts": ["new.example"]})
    service.reload()
    assert statuses(_daemon_request(service, b"", b"/x", b"new.example")) == [401]
    assert statuses(_daemon_request(service, token(ECHO_TOKEN), b"/x", b"old.example")) == [404]
    assert statuses(_daemon_request(service, token(ECHO_TOKEN), b"/x", b"new.example"))[:1] not in ([401], [403])

# -- the upstream: shutdown closes the pool, an upgrade gets its own connection from upgrade_endpoint -------


@pytest.mark.unit
def test_shutdown_closes_the_upstreams_pool() -> None:
    from twisted.internet.defer import succeed
    from twisted.internet.testing import MemoryReactorClock

    from hestia.gateway import Gateway
    from hestia.loader import parse_config

    config = parse_config({"services": {"echo": {"url": "http://127.0.0.1:9"}}}, "test.yml", environ={})
    gateway = Gateway(config, MemoryReactorClock())
    assert gateway.upstream.pool is not None
    closed: list[bool] = []

    def close() -> Any:
        closed.append(True)
        return succeed(None)

    gateway.upstream.pool.closeCachedConnections = close  # type: ignore[method-assign]
    done: list[object] = []
    gateway.shutdown().addBoth(done.append)
    assert closed == [True] and done == [None]


# -- cancellation through the async def conversions: a client that leaves --------------------------------------


def _ready_process() -> Any:
    from hestia.testing import MemoryGateway

    memory = MemoryGateway({"svc": {"url": "http://backend:1", "command": ["serve"]}})
    first = memory.get("/services/svc/x")
    memory.start("svc")
    assert memory.result(first).code == 200
    return memory


def _leave(memory: Any, answer: Any) -> None:
    """The client goes away: treq aborts the connection, Klein cancels the route's Deferred."""
    answer.addErrback(lambda failure: None)
    answer.cancel()
    memory.settle()


@pytest.mark.unit
def test_a_start_with_wait_goes_on_when_its_client_leaves() -> None:
    from hestia.testing import MemoryGateway

    memory = MemoryGateway({"svc": {"url": "http://backend:1", "command": ["serve"]}})
    answer = memory.request("POST", "/v1/services/svc/start?wait=true")
    memory.settle()
    _leave(memory, answer)
    memory.start("svc")
    assert memory.status("svc")["state"] == "ready"


@pytest.mark.unit
def test_a_stop_goes_on_when_its_client_leaves() -> None:
    memory = _ready_process()
    answer = memory.request("POST", "/v1/services/svc/stop")
    memory.settle()
    _leave(memory, answer)
    memory.fakes["svc"].finish_stop()
    memory.settle()
    assert memory.status("svc")["state"] == "stopped"


@pytest.mark.unit
def test_a_restart_without_wait_is_not_undone_by_its_client_leaving() -> None:
    memory = _ready_process()
    answer = memory.request("POST", "/v1/services/svc/restart")
    assert memory.result(answer).code == 202
    memory.fakes["svc"].finish_stop()
    memory.settle()
    assert len(memory.fakes["svc"].starts) == 2


@pytest.mark.unit
def test_a_restart_with_wait_is_finished_when_its_client_leaves_during_the_stop() -> None:
    memory = _ready_process()
    fake = memory.fakes["svc"]
    answer = memory.request("POST", "/v1/services/svc/restart?wait=true")
    memory.settle()
    assert memory.status("svc")["state"] == "stopping"
    _leave(memory, answer)
    fake.finish_stop()
    memory.settle()
    assert len(fake.starts) == 2, memory.status("svc")["state"]


@pytest.mark.unit
def test_a_restart_with_wait_is_finished_when_its_client_leaves_during_the_drain() -> None:
    from hestia.testing import MemoryGateway, StallingAgent

    memory = MemoryGateway({"svc": {"url": "http://backend:1", "command": ["serve"], "stop_timeout": 30}},
                           agent=lambda inner: StallingAgent(inner, only=["http://backend:1/held"]))
    warm = memory.get("/services/svc/x")
    memory.start("svc")
    assert memory.result(warm).code == 200
    held = memory.get("/services/svc/held")  # in flight: the restart drains it first
    held.addErrback(lambda failure: None)
    memory.settle()
    answer = memory.request("POST", "/v1/services/svc/restart?wait=true")
    memory.settle()
    _leave(memory, answer)
    memory.advance(31)  # stop_timeout: the drain gives up on the held request
    assert len(memory.fakes["svc"].stops) == 1


@pytest.mark.unit
def test_a_restart_joined_by_a_second_admin_answers_it_when_the_first_leaves() -> None:
    from hestia.testing import MemoryGateway, StallingAgent

    memory = MemoryGateway({"svc": {"url": "http://backend:1", "command": ["serve"], "stop_timeout": 30}},
                           agent=lambda inner: StallingAgent(inner, only=["http://backend:1/held"]))
    warm = memory.get("/services/svc/x")
    memory.start("svc")
    assert memory.result(warm).code == 200
    held = memory.get("/services/svc/held")
    held.addErrback(lambda failure: None)
    memory.settle()
    first = memory.request("POST", "/v1/services/svc/restart?wait=true")
    memory.settle()
    second = memory.request("POST", "/v1/services/svc/restart?wait=true")
    memory.settle()
    seen: list[Any] = []
    second.addBoth(seen.append)
    _leave(memory, first)
    # The second admin is still waiting for the restart it asked for; it was answered a text/html
    # 500 "Processing Failed" (and a CancelledError traceback in the log) instead.
    assert seen == [], [getattr(answer, "code", answer) for answer in seen]


@pytest.mark.unit
def test_a_cancelled_store_read_leaves_the_shared_open_alone() -> None:
    from twisted.internet.defer import Deferred

    from hestia.state import StateStore

    store = StateStore(":memory:")
    opening: Deferred[int] = Deferred()
    store._opened = opening  # the schema migration still running on the store's thread
    reading = store.events("svc")
    reading.addErrback(lambda failure: None)
    reading.cancel()
    assert not opening.called


# -- a command's output in the error's reason (exec: and machine backends) -------------------------------------


def _exec_start_failure(credential: str) -> dict[str, Any]:
    from hestia.backends.commands import CommandResult
    from hestia.backends.machine import start_failed

    hestia = MemoryHestia(PROCESS, auth=True)
    client = hestia.request(GET % (b"/services/echo/x", b"gw", token(credential)))
    result = CommandResult(("wake-box", "--api-key", "k3y-in-argv"), 1, None, False,
                           ("connecting", f"error: {SECRET} rejected"), 60.0)
    hestia.fakes["echo"].starts[0].errback(start_failed(result, "start command"))
    hestia.settle()
    raw = client.received()
    assert statuses(raw) == [502], raw
    document: dict[str, Any] = json.loads(body_of(raw))
    return document


@pytest.mark.unit
def test_an_exec_start_failures_output_lines_are_shown_to_an_admin() -> None:
    assert _exec_start_failure(ADMIN_TOKEN)["detail"] == ["connecting", f"error: {SECRET} rejected"]


@pytest.mark.unit
def test_an_exec_start_failures_output_is_not_in_the_error_to_a_service_token() -> None:
    document = _exec_start_failure(ECHO_TOKEN)
    assert "detail" not in document
    assert SECRET not in json.dumps(document), document


# -- tokens are never logged ------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("credential", [token(ADMIN_TOKEN), bearer(ECHO_TOKEN), token("wrong-but-secret-1234"),
                                        bearer("wrong-but-secret-5678"), token(ECHO_TOKEN)])
@pytest.mark.parametrize("path", [b"/services/echo/x", b"/services/other/x", b"/v1/services", b"/services/nope/x",
                                  b"/services/echo/../v1", b"/v1/health"])
def test_no_token_is_ever_logged_recorded_or_echoed(credential: bytes, path: bytes) -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict[str, Any]] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        hestia = MemoryHestia(PROCESS | {"other": {"url": "http://backend:8001"}}, auth=True)
        client = hestia.request(GET % (path, b"gw", credential))
        if hestia.fakes["echo"].starts:
            hestia.fakes["echo"].output = ["started"]
            hestia.fakes["echo"].exit("exit status 1")
        hestia.settle()
        hestia.advance(5)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert client.received()
    secret = credential.split(b" ")[-1].strip()
    assert secret not in client.received()  # never echoed back either
    for event in events:
        text = (formatEvent(event) + repr(event)).encode("utf-8", "replace")
        assert secret not in text, text[:300]
    for record in hestia.memory.records:
        assert secret.decode() not in repr(record)


# -- HTTP/2 to a host-routed service ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("credentials, status", [([], 401), ([(b"x-hestia-token", b"wrong")], 401),
                                                 ([(b"x-hestia-token", ECHO_TOKEN.encode())], 403),
                                                 ([(b"authorization", b"Bearer " + ADMIN_TOKEN.encode())], 200)])
def test_an_http2_stream_to_a_host_routed_service_is_authenticated(credentials: list[tuple[bytes, bytes]],
                                                                    status: int) -> None:
    from test_request_hardening import H2Client

    hestia = MemoryHestia(HOSTED, auth=True)
    client = H2Client(hestia)
    client.h2.send_headers(1, [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"),
                               (b":authority", b"other.example"), *credentials], end_stream=True)
    client.flush()
    assert client.statuses() == [status]
    assert len(hestia.backend.seen) == (status == 200)
    for headers in forwarded_headers(hestia):
        assert b"authorization" not in headers and b"x-hestia-token" not in headers


# -- through a route_by: model router, the serving target's settings ---------------------------------------------


def _turn_wait(router: dict[str, Any], target: dict[str, Any], path: str = "/services/ai/api/chat") -> Any:
    from hestia.testing import MemoryGateway, StallingAgent

    memory = MemoryGateway({"ai": {"route_by": "model", **router},
                            "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"],
                                     "max_concurrency": 1, **target}},
                           agent=lambda inner: StallingAgent(inner, times=1))
    body = b'{"model": "qwen2.5:7b"}'
    first = memory.request("POST", path, data=body)  # holds the one turn: its backend never answers
    first.addErrback(lambda failure: None)
    memory.settle()
    memory.start("qwen")
    second = memory.request("POST", path, data=body)
    seen: list[Any] = []
    second.addBoth(seen.append)
    memory.advance(6)
    return memory, seen


@pytest.mark.unit
def test_a_targets_queue_timeout_bounds_the_wait_for_a_turn_when_asked_directly() -> None:
    memory, seen = _turn_wait({}, {"queue_timeout": 5}, "/services/qwen/api/chat")
    assert [answer.code for answer in seen] == [504]
    assert memory.json(seen[0])["error"] == "request waited 5s for a turn with the backend (1 in progress)"


@pytest.mark.unit
def test_a_targets_queue_timeout_bounds_the_wait_for_a_turn_through_a_model_router() -> None:
    memory, seen = _turn_wait({}, {"queue_timeout": 5})
    assert [answer.code for answer in seen] == [504]
    assert memory.json(seen[0])["error"] == "request waited 5s for a turn with the backend (1 in progress)"


# -- an instances: service's admission-window errors name the service the client asked for ----------------------


def _pool_turns() -> tuple[Any, Any, list[Any]]:
    from hestia.testing import MemoryGateway, StallingAgent

    memory = MemoryGateway({"pool": {"instances": [{"url": "http://first:1", "command": ["a"]}],
                                     "max_concurrency": 1, "queue_limit": 1, "queue_timeout": 5}},
                           agent=lambda inner: StallingAgent(inner, times=1))
    holding = memory.get("/services/pool/x")  # the one turn, never answered
    holding.addErrback(lambda failure: None)
    memory.settle()
    memory.start("pool.0")
    waiting = memory.get("/services/pool/x")
    seen: list[Any] = []
    waiting.addBoth(seen.append)
    full = memory.result(memory.get("/services/pool/x"))
    return memory, full, seen


@pytest.mark.unit
def test_an_instances_admission_errors_name_the_service_and_the_instance() -> None:
    memory, full, seen = _pool_turns()
    assert full.code == 503
    assert memory.json(full) == {"error": "queue full: 1 requests already waiting for the backend",
                                 "service": "pool", "instance": "pool.0", "state": "ready", "retry_after": 1}
    memory.advance(6)
    assert [answer.code for answer in seen] == [504]
    assert memory.json(seen[0]) == {"error": "request waited 5s for a turn with the backend (1 in progress)",
                                    "service": "pool", "instance": "pool.0", "state": "ready"}


# -- the same on a real Hestia (twistd hestia, a real backend, a real exec: command) ------------------------------


LIVE_ADMIN, LIVE_LAPTOP, LIVE_NEW = "live-admin-0123456789", "live-laptop-0123456789", "live-new-0123456789"


def _live_config(echo: BackendSpec, laptop: str, tmp: Path) -> dict[str, Any]:
    from hestia.auth import digest

    return {
        "defaults": {"idle_timeout": 0},
        "services": {
            "echo": {**echo.service(), "hosts": ["echo.example"]},
            **{box: {"url": "http://127.0.0.1:9", "exec": {"start": ["sh", str(_wake_script(tmp)), box],
                                                          "stop": "true"}, "start_timeout": 5}
               for box in ("box", "box2")},
        },
        "auth": {"tokens": [
            {"name": "admin", "token_sha256": digest(LIVE_ADMIN).hex(), "scopes": ["admin"]},
            {"name": "laptop", "token_sha256": digest(laptop).hex(), "services": ["echo", "box", "box2"]},
        ], "max_failures": 1000},
    }


def _wake_script(tmp: Path) -> Path:
    """A start command whose output, not its command line, holds the secret."""
    script = tmp / "wake.sh"
    name, value = SECRET.split("=")
    script.write_text(f"echo connecting\nprintf 'error: %s=%s rejected\\n' {name} {value} >&2\nexit 3\n")
    return script


class Live:
    def __init__(self, hestia: HestiaProcess, echo: BackendSpec, tmp: Path) -> None:
        self.hestia, self.echo, self.tmp = hestia, echo, tmp

    def get(self, path: bytes, headers: bytes = b"", host: bytes = b"gw") -> Any:
        return raw_request(self.hestia.port, b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
                           + headers.rstrip(b"\r\n"))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("attack26")
    echo = BackendSpec("echo", tmp)
    hestia = HestiaProcess(_live_config(echo, LIVE_LAPTOP, tmp), tmp / "hestia").start()
    try:
        yield Live(hestia, echo, tmp)
    finally:
        hestia.stop()
        wait_for(lambda: not echo.running(), 5.0)
        reap_leftovers(str(tmp))


@pytest.mark.integration
def test_live_a_host_routed_request_needs_a_token_and_the_token_stays_in_hestia(live: Live) -> None:
    before = len(live.echo.requests())
    assert live.get(b"/echo", host=b"echo.example").status == 401
    assert live.get(b"/echo", bearer("wrong-0123456789"), host=b"echo.example").status == 401
    assert len(live.echo.requests()) == before
    assert live.get(b"/echo", bearer(LIVE_LAPTOP), host=b"echo.example").status == 200
    assert live.get(b"/echo", token(LIVE_LAPTOP), host=b"ECHO.example:1").status == 200
    seen = [entry for entry in live.echo.requests()[before:] if entry["path"] != "/health"]
    assert [entry["path"] for entry in seen] == ["/echo", "/echo"]
    for entry in seen:
        names = {name.lower() for name, _ in entry["headers"]}
        assert "authorization" not in names and "x-hestia-token" not in names
        assert LIVE_LAPTOP not in json.dumps(entry)
    assert LIVE_LAPTOP not in live.hestia.log_text() and "wrong-0123456789" not in live.hestia.log_text()


@pytest.mark.integration
def test_live_an_exec_start_failure_shows_its_output_to_the_admin(live: Live) -> None:
    response = live.get(b"/services/box/x", token(LIVE_ADMIN))
    assert response.status == 502, response
    assert f"error: {SECRET} rejected" in response.json()["detail"]


@pytest.mark.integration
def test_live_an_exec_start_failure_hides_its_output_from_a_service_token(live: Live) -> None:
    response = live.get(b"/services/box2/x", token(LIVE_LAPTOP))
    assert response.status == 502, response
    assert "detail" not in response.json()
    assert SECRET not in json.dumps(response.json()), response.json()


@pytest.mark.integration
def test_live_the_waiting_page_hides_an_exec_failures_output_from_a_service_token(live: Live) -> None:
    live.get(b"/services/box2/x", token(LIVE_LAPTOP))  # failed once (the test above may have run already)
    page = live.get(b"/services/box2/", token(LIVE_LAPTOP) + BROWSER)
    assert page.status == 503 and page.header_values("x-hestia-waiting") == ["box2"], page
    assert SECRET.encode() not in page.body, re.findall(rb".{80}" + re.escape(SECRET.encode()) + rb".{20}", page.body)


@pytest.mark.integration
def test_live_a_reload_that_replaces_a_token_reaches_the_proxy_at_once(live: Live) -> None:
    assert live.get(b"/services/echo/echo", token(LIVE_LAPTOP)).status == 200
    assert live.get(b"/services/echo/echo", token(LIVE_NEW)).status == 401
    live.hestia.write_config({**_live_config(live.echo, LIVE_NEW, live.tmp),
                              "server": {"listen": live.hestia.listen}})
    live.hestia.signal(signal.SIGHUP)
    assert wait_for(lambda: live.get(b"/services/echo/echo", token(LIVE_NEW)).status == 200, 10.0), \
        live.hestia.log_text()
    assert live.get(b"/services/echo/echo", token(LIVE_LAPTOP)).status == 401
    assert live.get(b"/echo", token(LIVE_LAPTOP), host=b"echo.example").status == 401
    assert live.get(b"/echo", token(LIVE_NEW), host=b"echo.example").status == 200
    live.hestia.write_config({**_live_config(live.echo, LIVE_LAPTOP, live.tmp),
                              "server": {"listen": live.hestia.listen}})
    live.hestia.signal(signal.SIGHUP)
    assert wait_for(lambda: live.get(b"/services/echo/echo", token(LIVE_LAPTOP)).status == 200, 10.0)



# -- a health probe that is cancelled ------------------------------------------------------------------------------


@implementer(IAgent)
class _PendingAgent:
    """An agent whose requests never answer; cancelling one is counted."""

    def __init__(self) -> None:
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        from twisted.internet.defer import Deferred

        def cancel(_: Any) -> None:
            self.cancelled += 1

        return Deferred(cancel)


@pytest.mark.unit
def test_cancelling_an_http_probe_cancels_its_request_and_its_timer() -> None:
    from twisted.internet.task import Clock

    from hestia.health import probe_http

    agent, clock = _PendingAgent(), Clock()
    probing = probe_http(agent, clock, "http://backend:1/health", 5.0)
    probing.addBoth(lambda result: None)
    probing.cancel()
    assert agent.cancelled == 1
    assert clock.getDelayedCalls() == []


@pytest.mark.unit
def test_a_cancelled_http_probe_fails_with_cancelled_error() -> None:
    from twisted.internet.defer import CancelledError
    from twisted.internet.task import Clock

    from hestia.health import probe_http

    probing = probe_http(_PendingAgent(), Clock(), "http://backend:1/health", 5.0)
    seen: list[Any] = []
    probing.addBoth(seen.append)
    probing.cancel()
    assert len(seen) == 1 and not isinstance(seen[0], bool) and seen[0].check(CancelledError), seen


# -- a Semaphore start cancelled while it re-probes a machine whose start task had finished ---------------------


class _SemaphoreClient:
    """A Semaphore whose recorded start task 7 has succeeded; counts the start tasks launched."""

    def __init__(self) -> None:
        self.launched: list[int] = []

    def task(self, task_id: int) -> Any:
        from twisted.internet.defer import succeed

        return succeed({"id": task_id, "status": "success"})

    def follow(self, task_id: int, waiting_timeout: float | None = None, on_update: Any = None) -> Any:
        from twisted.internet.defer import succeed

        return succeed({"id": task_id, "status": "success"})

    def output(self, task_id: int) -> Any:
        from twisted.internet.defer import succeed

        return succeed(["done"])

    def launch(self, template: int, environment: dict[str, Any], message: str = "") -> Any:
        from twisted.internet.defer import succeed

        self.launched.append(template)
        return succeed({"id": 99, "status": "waiting"})

    def detach(self) -> None:
        pass


@pytest.mark.unit
def test_a_cancelled_semaphore_start_launches_no_start_task() -> None:
    from twisted.internet.task import Clock

    from hestia.backends.semaphore.backend import SemaphoreBackend
    from hestia.loader import parse_config

    config = parse_config({
        "semaphore": {"base_url": "http://semaphore:3000", "project_id": 1, "token_env": "SEM_TOKEN"},
        "services": {"vm": {"url": "http://vm:1", "health": {"path": "/health"},
                            "semaphore": {"machine_id": "m-vm", "start_template_id": 1, "stop_template_id": 2}}},
    }, "test.yml", environ={"SEM_TOKEN": "a-semaphore-token-0123456789"})
    agent, client = _PendingAgent(), _SemaphoreClient()
    backend = SemaphoreBackend(config.services["vm"], Clock(), agent, client=client)  # type: ignore[arg-type]
    backend._phase, backend._task_id = "start", 7  # recalled: start task 7 was launched before
    starting = backend.start()
    seen: list[Any] = []
    starting.addBoth(seen.append)
    assert agent.cancelled == 0 and not seen  # probing the machine task 7 brought up
    starting.cancel()
    assert agent.cancelled == 1
    assert client.launched == [], "a start task was launched after the start was cancelled"


@pytest.mark.integration
def test_live_a_restart_whose_client_leaves_during_the_stop_still_starts_the_service(tmp_path: Path) -> None:
    slow = BackendSpec("slow", tmp_path)
    hestia = HestiaProcess({"defaults": {"idle_timeout": 0},
                            "services": {"slow": {**slow.service("--ignore-sigterm"), "stop_timeout": 2}}},
                           tmp_path / "hestia").start()
    try:
        assert raw_request(hestia.port, b"GET /services/slow/health HTTP/1.1\r\nHost: gw").status == 200
        with socket.create_connection(("127.0.0.1", hestia.port), timeout=5.0) as sock:
            sock.sendall(b"POST /v1/services/slow/restart?wait=true HTTP/1.1\r\nHost: gw\r\n"
                         b"Content-Length: 0\r\n\r\n")
            assert wait_for(lambda: hestia.state("slow") == "stopping", 5.0)
        # The admin's client gave up (closed); the stop takes stop_timeout (SIGTERM is ignored), then SIGKILL.
        wait_for(lambda: hestia.state("slow") == "ready", 10.0)
        assert hestia.state("slow") == "ready", hestia.status("slow")
    finally:
        hestia.stop()
        wait_for(lambda: not slow.running(), 5.0)
        reap_leftovers(str(tmp_path))
