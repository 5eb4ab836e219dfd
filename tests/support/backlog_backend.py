"""
A backend as small as C{python3 -m http.server}: listen backlog 5, HTTP/1.0.

Issue 13's test and benchmark backend.  Python's C{ThreadingHTTPServer} with
C{request_queue_size = 5} (the standard library's default, which
C{http.server} and Hestia's shipped demo run with), one connection per
request, a thread per connection::

    python tests/support/backlog_backend.py --port 8001 [--start-delay 0.5] [--stamp FILE]

  - C{GET /hang...} is taken and never answered (the handler sleeps);
  - C{GET /health} and every other path answer C{200} with a few bytes.

With C{--stamp FILE}, once it listens, C{FILE} holds C{{"pid", "listening"}}
(wall-clock seconds): the benchmark measures from that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SmallBacklogServer(ThreadingHTTPServer):
    request_queue_size = 5  # socketserver's default: what http.server listens with
    daemon_threads = True
    allow_reuse_address = True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # http.server's: the connection closes after each response

    def do_GET(self) -> None:
        if self.path.startswith("/hang"):
            threading.Event().wait()  # accepted, read, never answered
            return
        body = b"ok " + self.path.encode("ascii", "replace") + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--stamp", type=Path)
    args = parser.parse_args(argv)
    time.sleep(args.start_delay)
    server = SmallBacklogServer(("127.0.0.1", args.port), Handler)
    if args.stamp is not None:
        partial = args.stamp.with_name(args.stamp.name + ".tmp")
        partial.write_text(json.dumps({"pid": os.getpid(), "listening": time.time()}), encoding="ascii")
        os.replace(partial, args.stamp)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
