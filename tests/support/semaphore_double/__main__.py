"""Runs the double (`cli.main`): ``python tests/support/semaphore_double ...`` or ``python -m support.semaphore_double``."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as a directory: sys.path[0] is this package's own directory, whose modules (spec,
    # state, ...) must not shadow others.  tests/ takes its place so that ``support`` imports.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from support.semaphore_double.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
