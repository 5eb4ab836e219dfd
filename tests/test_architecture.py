"""
The package's structure, checked (issue 15): what may import what.

Imports are read from the source with C{ast}, every one of them: at module
level, inside functions (a function-local import is still a dependency, and
hides a cycle only from the interpreter), and under C{TYPE_CHECKING}.  Importing
C{hestia.a.b} also runs C{hestia.a}'s C{__init__}, so that counts too.
"""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "hestia"

# The lowest layer: records and interfaces every other module may use, importing
# no other Hestia module but each other.
FOUNDATION = {"hestia.errors", "hestia.interfaces", "hestia.records", "hestia.coroutines"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module that C{name} (a module, or a name in one) is defined in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every Hestia module C{module} imports, directly, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from hestia.config import model` imports the submodule; `import X` names a module.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        for target in targets:
            if target == "hestia" or target.startswith("hestia."):
                owner = _owner(target)
                if owner is not None:
                    found.add(owner)
    # Importing hestia.a.b runs hestia.a's __init__ first.
    for target in list(found):
        parts = target.split(".")
        for end in range(1, len(parts)):
            found.add(".".join(parts[:end]))
    found.discard(module)
    found.discard("hestia")  # the top package holds only the version
    return {target for target in found if not module.startswith(target + ".")}


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return components


def test_the_import_graph_is_read_from_every_kind_of_import() -> None:
    # A function-local import (the loader's section parsers are module-level, but
    # the gateway's GPU coordinator is imported where it is used) and a
    # TYPE_CHECKING one (the proxy names the Gateway type) are both edges.
    assert "hestia.gpu" in GRAPH["hestia.gateway"]
    assert "hestia.gateway" in GRAPH["hestia.proxy._exchange"]
    assert "hestia.config" in GRAPH["hestia.config.parse"] or "hestia.config.model" in GRAPH["hestia.config.parse"]


def test_no_import_cycle() -> None:
    assert _cycles() == []


def test_configuration_is_a_leaf() -> None:
    """hestia.config imports nothing of Hestia's outside itself (each feature parses its own section)."""
    outside = {
        module: sorted(target for target in GRAPH[module]
                       if target != "hestia.config" and not target.startswith("hestia.config."))
        for module in MODULES if module == "hestia.config" or module.startswith("hestia.config.")
    }
    assert {module: targets for module, targets in outside.items() if targets} == {}


# The layers, lowest first: a module imports only modules of its own layer or lower ones (and the
# cycle test keeps a layer's modules from importing each other in a ring).  docs/architecture.md
# draws the same table.
LAYERS: list[set[str]] = [
    # 0 foundation: records, interfaces, and tools that know nothing of Hestia.
    FOUNDATION | {"hestia.plugins", "hestia.strategies", "hestia.tls", "hestia.watch", "hestia.demo",
                  "hestia.backends.deferreds", "hestia.backends.environment"},
    # 1 the configuration's model and reader.
    {"hestia.config", "hestia.config.model", "hestia.config.reader", "hestia.config.document",
     "hestia.config.parse"},
    # 2 mechanisms, each with its own settings: probes, headers, queues, request hygiene, auth.
    {"hestia.health", "hestia.headers", "hestia.queue", "hestia.reload", "hestia.passive", "hestia.gpu",
     "hestia.guard", "hestia.auth", "hestia.tunnel", "hestia.admission"},
    # 3 backends: how a service is started and stopped.
    {"hestia.backends", "hestia.backends.commands", "hestia.backends.process", "hestia.backends.static",
     "hestia.backends.docker", "hestia.backends.docker.engine", "hestia.backends.docker.settings",
     "hestia.backends.docker.backend", "hestia.backends.docker.discovery", "hestia.backends.docker.reconnect",
     "hestia.backends.semaphore", "hestia.backends.semaphore.settings", "hestia.backends.semaphore.client", "hestia.backends.semaphore.backend",
     "hestia.backends.machine", "hestia.backends.wol", "hestia.backends.exec"},
    # 4 routes: one service's lifecycle, groups, multi-instance and model routes; their records.
    {"hestia.lifecycle", "hestia.groups", "hestia.routing", "hestia.schedule", "hestia.state",
     "hestia.costs_config",
     # how backends are reached: the client, its pool, the per-backend admission windows.
     "hestia.upstream"},
    # 5 the registry of routes.
    {"hestia.gateway"},
    # 6 what observes or feeds the gateway, and the loader (which needs discovery's section).
    {"hestia.loader", "hestia.costs", "hestia.prewarm", "hestia.events_stream",
     "hestia.logs", "hestia.metrics", "hestia.reconcile"},
    # 7 the web layer: proxy, pages, the management API.
    {"hestia.ui", "hestia.proxy", "hestia.proxy._errors", "hestia.proxy._exchange", "hestia.proxy._resources",
     "hestia.api", "hestia.planning", "hestia.preflight", "hestia.simulation"},
    # 8 entry points and the test doubles.
    {"hestia.server_tap", "hestia.cli", "hestia.testing", "hestia.testing.backends", "hestia.testing.conformance", "hestia.testing.gateway",
     "hestia.testing.site", "hestia.testing.upstream"},
]


def test_every_module_has_a_layer_and_imports_nothing_above_it() -> None:
    layer_of = {module: number for number, members in enumerate(LAYERS) for module in members}
    assert sorted(set(MODULES) - {"hestia"} - set(layer_of)) == []
    upward = sorted(f"{module} (layer {layer_of[module]}) -> {target} (layer {layer_of[target]})"
                    for module, targets in GRAPH.items() if module in layer_of
                    for target in targets if layer_of.get(target, 0) > layer_of[module])
    assert upward == []


def test_the_foundation_imports_only_itself() -> None:
    assert {module: sorted(GRAPH[module] - FOUNDATION) for module in FOUNDATION if GRAPH[module] - FOUNDATION} == {}


def test_observers_take_records_not_the_proxy() -> None:
    """Logs, metrics, costs and the event stream read a RequestRecord: none of them imports the proxy."""
    assert {module for module in ("hestia.logs", "hestia.metrics", "hestia.costs", "hestia.events_stream",
                                  "hestia.reconcile") if "hestia.proxy" in GRAPH[module]} == set()


def test_the_gateway_does_not_import_the_web_layer() -> None:
    assert GRAPH["hestia.gateway"] & {"hestia.proxy", "hestia.api", "hestia.ui", "hestia.reconcile"} == set()


TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore")
MAX_TYPE_IGNORES = 10


def test_few_type_ignores_and_mypy_reports_unused_ones() -> None:
    ignores = [f"{path.relative_to(ROOT)}:{number}"
               for path in PACKAGE.rglob("*.py")
               for number, line in enumerate(path.read_text().splitlines(), 1) if TYPE_IGNORE.search(line)]
    assert len(ignores) <= MAX_TYPE_IGNORES, ignores
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup.getboolean("mypy", "warn_unused_ignores")
    assert (PACKAGE / "py.typed").exists()


def private_twisted_names() -> dict[str, set[str]]:
    """Module -> the private Twisted names it imports (C{twisted.web._newclient}, C{_ChunkedTransferDecoder})."""
    found: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            private: list[str] = []
            if isinstance(node, ast.Import):
                private = [alias.name for alias in node.names if alias.name.startswith("twisted")
                           and any(part.startswith("_") for part in alias.name.split("."))]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                source = node.module or ""
                if any(part.startswith("_") for part in source.split(".")):
                    private.append(source)
                private += [f"{source}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
            if private:
                found.setdefault(module, set()).update(private)
    return found


def test_private_twisted_names_are_found() -> None:
    assert "twisted.web.http._ChunkedTransferDecoder" in private_twisted_names()["hestia.guard"]


def test_private_twisted_apis_are_named_in_one_place_with_the_reason() -> None:
    used = private_twisted_names()
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    section = architecture.split("## Private Twisted APIs", 1)
    assert len(section) == 2, "docs/architecture.md has no '## Private Twisted APIs' section"
    missing = sorted(name for names in used.values() for name in names if name.rpartition(".")[2] not in section[1])
    assert missing == []


def test_the_architecture_document_names_every_module() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = sorted(module for module in MODULES if module != "hestia" and f"`{module}`" not in architecture
                     and f"`{module.removeprefix('hestia.')}`" not in architecture)
    assert unnamed == []


def test_one_async_style() -> None:
    """async def (returned as a Deferred by hestia.coroutines.as_deferred), never inlineCallbacks."""
    found = [f"{path.relative_to(ROOT)}:{number}"
             for path in PACKAGE.rglob("*.py")
             for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == "@inlineCallbacks"]
    assert found == []


SEAM_NAMES = {"reactor", "store", "route", "routes", "gateway", "agent"}


def test_no_any_for_routes_stores_or_the_reactor_at_module_seams() -> None:
    """Parameters and attributes with these names are typed (Twisted's interfaces, IStateStore, Route)."""
    untyped = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.arg) and node.arg.lstrip("_") in SEAM_NAMES:
                annotation = node.annotation
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, (ast.Name, ast.Attribute)):
                name = node.target.id if isinstance(node.target, ast.Name) else node.target.attr
                annotation = node.annotation if name.lstrip("_") in SEAM_NAMES else None
            else:
                continue
            if annotation is not None and "Any" in ast.unparse(annotation).replace("|", " ").split():
                untyped.append(f"{module}:{node.lineno}")
    assert untyped == []
