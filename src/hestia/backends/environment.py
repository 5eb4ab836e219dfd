"""
The environment of the processes Hestia starts: its own, less its secrets.

A service's command and an exec or wol backend's commands inherit Hestia's
environment (C{PATH}, locale, a cloud CLI's settings), but not the variables
that hold Hestia's own credentials: the C{token_env} of every C{auth:} token,
the Semaphore API token and C{HESTIA_TOKEN}.  A service is often something
its users run code in (a notebook); with the admin token in its environment
any of them could read it.  A service's own C{env:} is added after, so the
configuration can still pass a variable on by name.

The names live here, set by the daemon at start and at each reload, because
the backends are built by plugin factories that see only their own service's
configuration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

ALWAYS_HIDDEN = frozenset({"HESTIA_TOKEN"})  # the command-line client's admin token
_hidden: set[str] = set(ALWAYS_HIDDEN)


def hide_from_children(names: Iterable[str]) -> None:
    """Keep these variables (besides L{ALWAYS_HIDDEN}) out of every process started from now on."""
    names = ALWAYS_HIDDEN | frozenset(names)
    _hidden.clear()
    _hidden.update(names)


def hidden_variables() -> frozenset[str]:
    return frozenset(_hidden)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Hestia's environment without the hidden variables, plus C{extra} (a service's C{env:})."""
    env = {name: value for name, value in os.environ.items() if name not in _hidden}
    env.update(extra or {})
    return env
