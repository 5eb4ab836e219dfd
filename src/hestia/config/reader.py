"""
L{Reader}: the typed accessors every section's parser uses.

Each raises L{ConfigError} naming the file and the key, so that a feature's
own section (docker, semaphore, routing, auth, ...) reports problems the
same way as the core keys do.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from hestia.config.model import MAX_COUNT, MAX_DURATION, ConfigError

# re.ASCII: "\d" would also match "²" or "٣", which int() and float() refuse.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.ASCII)
_WHOLE_NUMBER = re.compile(r"^\s*\d{1,20}\s*$", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

class Reader:
    """Typed accessors that raise L{ConfigError} naming C{source} and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {describe(value)}")
        return value

    def check_keys(self, value: Mapping[str, Any], allowed: set[str], key: str) -> None:
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                # A misspelling is the usual cause: name the key that was meant.
                close = difflib.get_close_matches(str(name), allowed, n=1)
                if close:
                    raise self.fail(where, f"unknown key (did you mean {close[0]}?)")
                raise self.fail(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def duration(self, value: Any, key: str, maximum: float = MAX_DURATION) -> float:
        if isinstance(value, bool):
            raise self.fail(key, f"expected a number of seconds, got {describe(value)}")
        if isinstance(value, int) and abs(value) > maximum:
            seconds = math.copysign(math.inf, value)  # float() of a huge int would raise
        elif isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        else:
            raise self.fail(
                key, f"expected a number of seconds (or '30s', '5m', '1h'), got {describe(value)}"
            )
        if math.isnan(seconds):
            raise self.fail(key, "expected a number of seconds, got NaN")
        if seconds < 0:
            raise self.fail(key, "must not be negative")
        if seconds > maximum:
            raise self.fail(key, f"must be at most {_longest(maximum)}, got {describe(value)}")
        return seconds

    def integer(self, value: Any, key: str, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
        if isinstance(value, str) and _WHOLE_NUMBER.match(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {describe(value)}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}")
        if value > maximum:
            raise self.fail(key, f"must be at most {maximum}, got {describe(value)}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.strip().lower()]
        raise self.fail(key, f"expected true or false, got {describe(value)}")

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {describe(value)}")
        return value


    def size(self, value: Any, key: str, maximum: int) -> int:
        """A byte count: C{1048576}, C{"512k"}, C{"10m"}, C{"4g"} (binary units), at most C{maximum}."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            size = value
        else:
            match = _SIZE.match(value) if isinstance(value, str) else None
            if match is None:
                raise self.fail(key, f"expected a size in bytes (or '512k', '10m', '4g'), got {describe(value)}")
            unit = (match.group(2) or "b")[0].lower()
            size = int(match.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
        if size > maximum:
            raise self.fail(key, f"must be at most {maximum} bytes, got {describe(value)}")
        return size

    def url(self, value: Any, key: str) -> str:
        """An C{http://} or C{https://} URL with a host (and a valid port), without a trailing C{/}."""
        url = self.string(value, key)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(key, f"expected an http:// or https:// URL with a host, got {url!r}")
        try:
            _ = parts.port  # Parsing the port is what validates it.
        except ValueError:
            raise self.fail(key, f"bad port in {url!r}") from None
        return url.rstrip("/")


def _longest(seconds: float) -> str:
    """A bound as people write it: C{24h}, C{2592000 seconds (30 days)}."""
    if seconds > 86400 and seconds % 86400 == 0:
        return f"{seconds:.0f} seconds ({seconds / 86400:g} days)"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"


BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True,
                  "false": False, "no": False, "off": False, "0": False}


def describe(value: Any) -> str:
    """A value as an error message shows it: its type and a short repr."""
    if value is None:
        return "nothing"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


_SIZE = re.compile(r"^\s*(\d{1,20})\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE | re.ASCII)


_SIZE = re.compile(r"^\s*(\d{1,20})\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE | re.ASCII)
