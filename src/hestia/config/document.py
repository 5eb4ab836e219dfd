"""
Reading C{hestia_config.yml}: strict YAML (no duplicate keys, no alias bombs), UTF-8 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hestia.config.model import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """
    A SafeLoader that refuses a key given twice in one mapping.

    PyYAML keeps the last value, so a second C{auth:} block further down would
    silently replace the first (turning authentication off).  Keys merged in
    with C{<<:} may still be overridden: that is what a merge is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # An unhashable key: the base class says so.
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key!r} (first given on line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


# Aliases let a few lines stand for a huge document (nine lines of nine
# aliases each are 9**9 values): Python shares the objects, but every walk
# over the configuration -- a start's json.dumps, a reload's comparison --
# pays for the whole expansion.  A real configuration is far smaller.
MAX_YAML_NODES = 1_000_000


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past L{MAX_YAML_NODES} values, or contain themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to itself", node.start_mark)
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key) + size(value) for key, value in node.value)
        open_nodes.discard(id(node))
        if total > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to more than {MAX_YAML_NODES} values", node.start_mark)
        sizes[id(node)] = total
        return total

    size(root)


def yaml_document(text: str, source: str) -> Any:
    """Parse C{text}; any YAML problem (duplicate keys too) is one line naming the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(source, "", f"invalid YAML: {where}{problem}") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, RecursionError) as error:
        # PyYAML's constructors of explicit tags (`!!timestamp 2001-01-01x`,
        # `!!int x`, a nesting thousands deep) raise these, not YAMLError.
        raise ConfigError(source, "", f"invalid YAML: a value it cannot read ({type(error).__name__})") from None

def read_document(path: str) -> tuple[Any, Path]:
    """
    The YAML document in the file at C{path}, and the directory relative
    paths in it are relative to.

    @raise ConfigError: the file cannot be read, is not UTF-8, or is not YAML.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ConfigError(str(path), "", f"cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            str(path), "", f"not UTF-8 text: line {line} has the byte 0x{data[error.start]:02x}"
        ) from None
    return yaml_document(text, str(path)), file.resolve().parent
