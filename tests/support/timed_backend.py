"""``tests/support/backend.py`` whose request log stamps each request with its arrival time.

The readiness test measures, on the backend's own clock, the gap between the
moment it could first answer its health check (its socket listening) and the
arrival of the request the gateway held during the start.  Same options as
``backend.py``; each ``--request-log`` entry gains ``"t"`` (``time.time()``
when the request line was read), and the log starts with a
``{"path": "<listening>", "t": ...}`` entry written right after ``listen()``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import backend


def record(self: backend.BackendServer, method: str, path: str, headers: list[list[str]]) -> None:
    arrived = time.time()
    with self.lock:
        self.requests += 1
        if self.log is not None:
            entry = {"method": method, "path": path, "headers": headers, "t": arrived}
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()


_init = backend.BackendServer.__init__


def init(self: backend.BackendServer, config: backend.Config) -> None:
    _init(self, config)  # binds and listens
    if self.log is not None:
        self.log.write(json.dumps({"method": "-", "path": "<listening>", "headers": [], "t": time.time()}) + "\n")
        self.log.flush()


backend.BackendServer.record = record  # type: ignore[method-assign]
backend.BackendServer.__init__ = init  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(backend.main())
