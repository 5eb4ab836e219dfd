"""
The one plugin lookup, for backends (C{hestia.backends}) and routing
strategies (C{hestia.strategies}): one precedence rule for both.

A built-in name is always the built-in: an installed package cannot replace
C{process} or C{round-robin} behind the configuration's back.  Any other name
is looked up in the entry-point group; two distributions registering the same
name is an error that names both, not a silent pick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points


class PluginNotFound(LookupError):
    """No plugin of that name: C{known} lists the names there are."""

    def __init__(self, group: str, name: str, known: list[str]) -> None:
        super().__init__(f"no plugin named {name!r} in entry-point group {group}")
        self.group, self.name, self.known = group, name, known


class PluginBroken(LookupError):
    """The entry point exists but cannot be loaded (or is registered twice)."""

    def __init__(self, where: str, error: str) -> None:
        super().__init__(f"{where}: {error}")
        self.where, self.error = where, error


@dataclass(frozen=True)
class Plugin:
    """What L{find_plugin} found: the factory, and where it came from (for error messages)."""

    factory: object
    where: str
    built_in: bool


def find_plugin(group: str, name: str, built_in: Mapping[str, object]) -> Plugin:
    """
    The factory registered as C{name}: the built-in of that name, else the
    entry point of C{group} of that name.

    @raise PluginNotFound: neither exists.
    @raise PluginBroken: the entry point is registered twice or does not import.
    """
    if name in built_in:
        return Plugin(built_in[name], f"built-in {name!r}", built_in=True)
    found: list[EntryPoint] = list(entry_points(group=group, name=name))
    if not found:
        known = sorted({entry.name for entry in entry_points(group=group)} | set(built_in))
        raise PluginNotFound(group, name, known)
    where = f"plugin {name!r} ({found[0].value})"
    distinct = sorted({entry.value for entry in found})
    if len(distinct) > 1:
        raise PluginBroken(where, f"registered more than once in {group}: {', '.join(distinct)}")
    try:
        return Plugin(found[0].load(), where, built_in=False)
    except Exception as error:  # any import-time failure of foreign code
        raise PluginBroken(where, f"cannot be loaded: {type(error).__name__}: {error}") from None
