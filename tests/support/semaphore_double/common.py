"""What every module of the double shares: the JSON alias, the repository root, timestamps."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
REPO_ROOT = Path(__file__).resolve().parents[3]


def now_iso() -> str:
    """Timestamps look like Go's RFC 3339 output, which is what a client parses."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def str_keys(node: Any) -> Any:
    """YAML turns ``200:`` into an int key; JSON pointers and JSON Schema need strings."""
    if isinstance(node, dict):
        return {str(k): str_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [str_keys(v) for v in node]
    return node
