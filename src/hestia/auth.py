"""
Optional authentication: bearer tokens with scopes, checked before anything starts.

Off unless the configuration has an C{auth:} section with tokens::

    auth:
      tokens:
        - {name: admin, token_env: HESTIA_ADMIN_TOKEN, scopes: [admin]}
        - {name: laptop, token_file: /etc/hestia/laptop.token, services: [ollama]}
        - {name: ci, token_sha256: "<hex digest>", services: [ollama, web]}
      max_failures: 10        # wrong tokens per client per window before 429
      failure_window: 60      # seconds

A token is never written in the YAML as plain text: only an environment
variable name, a file, or its SHA-256 digest.  Hestia keeps only digests in
memory, and compares the digest of what a client presents against each of them
with L{hmac.compare_digest}, so that neither the comparison time nor a log line
can give a token away.

Why check before the lease: a request that is refused must not cold-start a
cloud VM.  Why rate-limit only wrong tokens: a missing token is a client that
does not know auth is on (a 401 tells it); a wrong one is someone guessing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from hestia.config import Config, ConfigError, Reader
from hestia.errors import refusal_document, write_json
from hestia.interfaces import IHeadCheck
from hestia.records import Denied, credentials_of

log = Logger(namespace="hestia.auth")

AUTH_KEYS = {"tokens", "max_failures", "failure_window"}
TOKEN_KEYS = {"name", "token_env", "token_file", "token_sha256", "scopes", "services"}
TOKEN_SOURCES = ("token_env", "token_file", "token_sha256")
SCOPES = {"admin"}

AUTHORIZATION = b"authorization"
TOKEN_HEADER = b"x-hestia-token"
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")
_BEARER = re.compile(rb"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_MAX_TRACKED_CLIENTS = 10_000


@dataclass(frozen=True)
class Token:
    """One configured token: only its digest, never its value."""

    name: str
    digest: bytes
    admin: bool = False
    services: frozenset[str] = frozenset()

    def may_reach(self, service: str) -> bool:
        return self.admin or service in self.services


@dataclass(frozen=True)
class AuthConfig:
    """The parsed C{auth:} section.  No tokens means authentication is off."""

    tokens: tuple[Token, ...] = ()
    max_failures: int = 10
    failure_window: float = 60.0
    pass_authorization: frozenset[str] = field(default_factory=frozenset)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


def digest(token: bytes | str) -> bytes:
    """The SHA-256 of a token: what Hestia stores and compares."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    return hashlib.sha256(token).digest()


def parse_auth(config: Config, environ: Mapping[str, str] | None = None) -> AuthConfig:
    """
    Read C{config.sections["auth"]}, resolving each token to its digest.

    @raise ConfigError: naming the file and the key, never the token.
    """
    environ = os.environ if environ is None else environ
    source = config.source
    passing = frozenset(name for name, service in config.services.items() if service.pass_authorization)
    raw = config.sections.get("auth")
    if raw is None:
        return AuthConfig(pass_authorization=passing)
    if not isinstance(raw, dict):
        raise ConfigError(source, "auth", "expected a mapping with tokens: [...]")
    for key in raw:
        if key not in AUTH_KEYS:
            raise ConfigError(source, f"auth.{key}", f"unknown key (expected one of: {', '.join(sorted(AUTH_KEYS))})")
    entries = raw.get("tokens") or []
    if not isinstance(entries, list):
        raise ConfigError(source, "auth.tokens", "expected a list of tokens")
    tokens = tuple(_token(source, index, entry, config, environ) for index, entry in enumerate(entries))
    names = [token.name for token in tokens]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(source, "auth.tokens", f"two tokens are named {name!r}")
    seen: set[bytes] = set()
    for token in tokens:
        if token.digest in seen:
            raise ConfigError(source, f"auth.tokens.{token.name}", "has the same value as another token")
        seen.add(token.digest)
    # The shared readers bound every number (no NaN, no .inf: hestia.config).
    reader = Reader(source)
    max_failures = reader.integer(raw.get("max_failures", AuthConfig.max_failures), "auth.max_failures", minimum=1)
    window = reader.duration(raw.get("failure_window", AuthConfig.failure_window), "auth.failure_window")
    if window <= 0:
        raise ConfigError(source, "auth.failure_window", "expected a number of seconds above 0")
    return AuthConfig(tokens, max_failures, window, passing)


def secret_variables(config: Config) -> frozenset[str]:
    """
    The environment variables that hold Hestia's own credentials: each token's
    C{token_env}, and the Semaphore API token's.  Kept out of the processes
    Hestia starts (L{hestia.backends.environment}).
    """
    names: set[str] = set()
    raw = config.sections.get("auth")
    entries = raw.get("tokens") if isinstance(raw, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("token_env"), str):
            names.add(entry["token_env"])
    semaphore = config.sections.get("semaphore")
    if isinstance(semaphore, dict):
        names.add("SEMAPHORE_API_TOKEN")
        if isinstance(semaphore.get("token_env"), str):
            names.add(semaphore["token_env"])
    return frozenset(names)


def _token(source: str, index: int, raw: Any, config: Config, environ: Mapping[str, str]) -> Token:
    key = f"auth.tokens[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(source, key, "expected a mapping such as {name: laptop, token_env: VAR, services: [x]}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, f"{key}.name", "every token needs a name (it is what the log shows)")
    key = f"auth.tokens.{name}"
    for field_name in raw:
        if field_name not in TOKEN_KEYS:
            raise ConfigError(
                source, f"{key}.{field_name}",
                f"unknown key (expected one of: {', '.join(sorted(TOKEN_KEYS))}; plain-text tokens are not accepted)",
            )
    given = [source_key for source_key in TOKEN_SOURCES if source_key in raw]
    if len(given) != 1:
        raise ConfigError(source, key, "give exactly one of token_env, token_file, token_sha256")
    value = raw[given[0]]
    if not isinstance(value, str) or not value:
        raise ConfigError(source, f"{key}.{given[0]}", "expected a non-empty string")
    if given[0] == "token_env":
        secret = environ.get(value, "").strip()
        if not secret:
            raise ConfigError(source, f"{key}.token_env", f"environment variable {value} is not set or empty")
        token_digest = digest(secret)
    elif given[0] == "token_file":
        try:
            secret = Path(value).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(source, f"{key}.token_file", f"cannot read {value}: {error.strerror}") from None
        if not secret:
            raise ConfigError(source, f"{key}.token_file", f"{value} is empty")
        token_digest = digest(secret)
    else:
        if not _HEX_DIGEST.match(value):
            raise ConfigError(source, f"{key}.token_sha256", "expected 64 hexadecimal digits (sha256sum of the token)")
        token_digest = bytes.fromhex(value)
    scopes = _names(source, f"{key}.scopes", raw.get("scopes"))
    for scope in scopes:
        if scope not in SCOPES:
            raise ConfigError(source, f"{key}.scopes", f"unknown scope {scope!r} (expected: admin)")
    services = _names(source, f"{key}.services", raw.get("services"))
    for service in services:
        if service not in config.services:
            raise ConfigError(source, f"{key}.services", f"no service named {service!r}")
    if not scopes and not services:
        raise ConfigError(source, key, "grants nothing: give scopes: [admin] and/or services: [...]")
    return Token(name, token_digest, "admin" in scopes, frozenset(services))


def _names(source: str, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(source, key, "expected a list of names")
    return value


def credential_headers(auth_enabled: bool, pass_authorization: bool) -> frozenset[bytes]:
    """
    The request headers that must not reach a backend.

    C{X-Hestia-Token} is Hestia's own and never forwarded.  C{Authorization}
    is consumed when Hestia checks it, which is whenever auth is on, unless the
    service is configured to receive its clients' own C{Authorization}.
    """
    if auth_enabled and not pass_authorization:
        return frozenset({TOKEN_HEADER, AUTHORIZATION})
    return frozenset({TOKEN_HEADER})


class Authenticator:
    """
    Decides whether a request may reach a service or C{/v1}.

    Holds the failure history per client address (bounded), which is why it
    outlives configuration reloads: L{update} swaps the tokens only.

    @param clock: seconds now (the reactor's C{seconds}).
    """

    def __init__(self, config: AuthConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def update(self, config: AuthConfig) -> None:
        self.config = config
        # Each history is bounded by max_failures: re-bound them, or a reload that raises
        # the limit leaves known guessers with histories too short ever to reach it.
        self._failures = {
            client: deque(history, maxlen=config.max_failures) for client, history in self._failures.items()
        }

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # -- the checks --------------------------------------------------------------

    def check_service(self, request: Request, service: str) -> Denied | None:
        """
        May C{request} reach C{service}?  Marks the headers to strip either way.
        """
        passing = service in self.config.pass_authorization
        credentials = credentials_of(request)
        credentials.consumed = credential_headers(self.enabled, passing)
        if not self.enabled:
            credentials.may_see_output = True
            return None
        return self._check(request, lambda token: token.may_reach(service), allow_bearer=not passing,
                           scope=f"service {service}")

    def check_admin(self, request: Request) -> Denied | None:
        """May C{request} use C{/v1} (other than C{/v1/health})?"""
        if not self.enabled:
            return None
        return self._check(request, lambda token: token.admin, allow_bearer=True, scope="the management API")

    def _check(self, request: Request, allowed: Callable[[Token], bool], *, allow_bearer: bool,
               scope: str) -> Denied | None:
        # Decided once per request and scope: the channel asks when the head is
        # in (before a body), the resource again when it renders; a wrong token
        # must count once against the client.
        credentials = credentials_of(request)
        if credentials.decision is not None and credentials.decision[0] == scope:
            return credentials.decision[1]
        denied = self._decide(request, allowed, allow_bearer=allow_bearer, scope=scope)
        credentials.decision = (scope, denied)
        return denied

    def _decide(self, request: Request, allowed: Callable[[Token], bool], *, allow_bearer: bool,
                scope: str) -> Denied | None:
        client = _client(request)
        presented = _presented(request, allow_bearer)
        limited = self._limited(client)
        if limited is not None:
            return Denied(429, "too many failed authentication attempts: slow down", limited)
        if presented is None:
            header = "X-Hestia-Token" if not allow_bearer else "Authorization: Bearer <token> or X-Hestia-Token"
            return Denied(401, f"authentication required: send {header}")
        token = self._match(presented)
        if token is None:
            self._failed(client)
            log.warn("wrong token from {client} for {scope}", client=client, scope=scope)
            return Denied(401, "invalid token")
        if not allowed(token):
            log.warn("token {name} may not reach {scope}", name=token.name, scope=scope)
            return Denied(403, f"token {token.name!r} does not grant {scope}")
        credentials = credentials_of(request)
        credentials.token_name, credentials.admin = token.name, token.admin
        # The logs route shows a service's output to admin tokens only; error bodies follow it.
        credentials.may_see_output = token.admin
        return None

    def _match(self, presented: bytes) -> Token | None:
        candidate = digest(presented)
        found = None
        for token in self.config.tokens:  # No early exit: every token costs the same.
            if hmac.compare_digest(candidate, token.digest):
                found = token
        return found

    # -- slowing down guessers ---------------------------------------------------

    def _recent(self, client: str) -> deque[float]:
        history = self._failures.get(client)
        if history is None:
            return deque()
        horizon = self._clock() - self.config.failure_window
        while history and history[0] <= horizon:
            history.popleft()
        if not history:
            del self._failures[client]
        return history

    def _limited(self, client: str) -> float | None:
        history = self._recent(client)
        if len(history) < self.config.max_failures:
            return None
        return max(1.0, history[0] + self.config.failure_window - self._clock())

    def _failed(self, client: str) -> None:
        if client not in self._failures and len(self._failures) >= _MAX_TRACKED_CLIENTS:
            for stale in list(self._failures)[: _MAX_TRACKED_CLIENTS // 10]:
                self._recent(stale)
            if len(self._failures) >= _MAX_TRACKED_CLIENTS:
                self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(client, deque(maxlen=self.config.max_failures)).append(self._clock())


def _client(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "unix"))


def _presented(request: Request, allow_bearer: bool) -> bytes | None:
    """
    The token the client sent: C{X-Hestia-Token} first, then a bearer token.

    An empty C{X-Hestia-Token} (a client that sets the header from an unset
    variable) is no token: it does not hide a bearer token sent with it.
    """
    for value in request.requestHeaders.getRawHeaders(TOKEN_HEADER) or []:
        if value.strip():
            return value.strip()
    if allow_bearer:
        for value in request.requestHeaders.getRawHeaders(AUTHORIZATION) or []:
            match = _BEARER.match(value)
            if match:
                return match.group(1)
    return None


def write_denied(request: Request, denied: Denied, service: str | None = None) -> None:
    """Answer C{request} with C{denied}: JSON, C{WWW-Authenticate} on 401."""
    body = refusal_document(denied.reason, service, denied.retry_after)
    write_json(request, denied.status, body, retry_after=denied.retry_after)


def is_open_route(method: bytes, segments: list[bytes]) -> bool:
    """
    The C{/v1} routes that need no token: health (for monitors) and static
    files that hold no state (the dashboard's page and scripts, which then
    call the API with the admin token they keep: a browser must load them without
    a token, or nobody could ever type one in), and the OpenAPI contract.  Exact matches only:
    C{/v1/health/x} or C{/v1//health} are not health.
    """
    if method not in (b"GET", b"HEAD"):
        return False
    if segments in ([b"health"], [b"openapi.yaml"], [b"ui"], [b"ui", b""]):
        return True
    return len(segments) == 2 and segments[0] == b"ui" and _ASSET.match(segments[1]) is not None


_ASSET = re.compile(rb"^[A-Za-z0-9_-]+\.[a-z0-9]+$")


@implementer(IHeadCheck)
class AdminGuard(Resource):
    """
    Wraps the C{/v1} Klein resource: only C{admin} tokens get past, except to
    L{is_open_route}: C{GET /v1/health}, which monitoring must reach without a secret.

    A leaf, like the Klein resource it wraps, which therefore sees the same
    C{prepath} and C{postpath} it would see unwrapped.
    """

    isLeaf = True

    def __init__(self, api: IResource, authenticator: Authenticator) -> None:
        super().__init__()
        self.api = api
        self.authenticator = authenticator

    def check_head(self, request: Request) -> Denied | None:
        # Asked only when a body follows.  The open routes are open to a GET
        # without one: a body sent to them is not read for a client without
        # a token (it could be up to max_body_size, spooled to disk).
        return self.authenticator.check_admin(request)

    def render(self, request: Request) -> Any:
        try:
            # Klein decodes the path as UTF-8 and answers a traceback's worth
            # of log and a text/html 400 when it cannot: refuse it here, in JSON.
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            write_denied(request, Denied(400, "the path is not percent-encoded UTF-8"))
            return NOT_DONE_YET
        if not is_open_route(request.method, list(request.postpath or [])):
            denied = self.authenticator.check_admin(request)
            if denied is not None:
                write_denied(request, denied)
                return NOT_DONE_YET
        return self.api.render(request)
