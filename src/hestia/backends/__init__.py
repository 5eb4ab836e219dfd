"""
Backend plugins, found by name.

The built-in backends are listed here and, like third-party ones, in the
C{hestia.backends} entry-point group; every factory is checked against
L{IBackendFactory} when loaded, so a broken plugin is a clear error at start-up
rather than an C{AttributeError} on the first request.
"""

from __future__ import annotations

from typing import Any

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from hestia.backends.docker import DockerBackendFactory
from hestia.backends.exec import ExecBackendFactory
from hestia.backends.process import ProcessBackendFactory
from hestia.backends.semaphore import SemaphoreBackendFactory
from hestia.backends.static import StaticBackendFactory
from hestia.backends.wol import WakeOnLanBackendFactory
from hestia.interfaces import IBackendFactory
from hestia.plugins import PluginBroken, PluginNotFound, find_plugin

ENTRY_POINT_GROUP = "hestia.backends"

# The factories are classes providing IBackendFactory (not instances of it).
BUILT_IN: dict[str, Any] = {
    "process": ProcessBackendFactory,
    "static": StaticBackendFactory,
    "docker": DockerBackendFactory,
    "semaphore": SemaphoreBackendFactory,
    "wol": WakeOnLanBackendFactory,
    "exec": ExecBackendFactory,
}


class BackendNotFound(LookupError):
    pass


def find_backend(name: str) -> Any:
    """The factory registered as C{name}: built in, or from an entry point (L{hestia.plugins})."""
    try:
        plugin = find_plugin(ENTRY_POINT_GROUP, name, BUILT_IN)
    except PluginNotFound:
        raise BackendNotFound(f"no backend plugin named {name!r} (entry-point group {ENTRY_POINT_GROUP})") from None
    except PluginBroken as broken:
        raise BackendNotFound(f"backend {broken.where} is broken: {broken.error}") from None
    try:
        verifyObject(IBackendFactory, plugin.factory)
    except (AttributeError, Invalid) as error:
        raise BackendNotFound(f"backend {plugin.where} is broken: {error}") from None
    return plugin.factory
