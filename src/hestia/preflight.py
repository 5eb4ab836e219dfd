"""
What a configuration must pass before Hestia runs it.

C{twistd hestia} and C{hestia check-config} both call L{load_checked}, so that
a file the checker accepts is a file the daemon starts with (an unset
C{token_env} used to pass one and stop the other).  Every refusal is a
L{ConfigError}: one line naming the file and the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime

from hestia.auth import parse_auth
from hestia.config import Config, ConfigError
from hestia.loader import load_config
from hestia.tls import PREFIX as TLS_PREFIX
from hestia.tls import _split_unescaped


def check_listen(source: str, key: str, description: str, reactor: IReactorTime | None = None) -> None:
    """
    Refuse an endpoint description Twisted cannot parse (C{tcp:abc}, C{bogus:1}).

    Parsing builds the endpoint object without listening, so nothing is bound
    here; a port that is busy is found when Hestia listens (L{hestia.server_tap}).
    """
    if reactor is None:
        from twisted.internet import reactor
    inner = description
    if description.startswith(TLS_PREFIX):
        _, _, inner = _split_unescaped(description[len(TLS_PREFIX):])
        if not inner:
            raise ConfigError(source, key, f"expected txsni:<certificate directory>:<endpoint>, got {description!r}")
    try:
        serverFromString(reactor, inner)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ConfigError(source, key, f"not a listening endpoint ({error}): {description!r}, "
                          "expected e.g. tcp:8080 or tcp:8080:interface=127.0.0.1") from None


def load_checked(
    path: str | None = None, environ: Mapping[str, str] | None = None, listen: str | None = None
) -> Config:
    """
    L{load_config} plus everything else start-up needs from the file: the
    token sources of C{auth:} and the listening endpoints.

    @param listen: a C{--listen} that overrides C{server.listen}.
    """
    config = load_config(path, environ)
    parse_auth(config, environ)  # Token files and variables must be there now.
    if listen is not None:
        check_listen("--listen", "", listen)
    elif (environ if environ is not None else os.environ).get("HESTIA_LISTEN"):
        # The value is not in the file: name where it came from.
        check_listen("$HESTIA_LISTEN", "", config.server.listen)
    else:
        check_listen(config.source, "server.listen", config.server.listen)
    if config.server.redirect_listen:
        check_listen(config.source, "server.redirect_listen", config.server.redirect_listen)
    return config
