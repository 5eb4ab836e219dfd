"""
The demo service of the shipped configurations: C{hestia-demo --port 8765}.

A static web server that shows what just happened: "started on demand by Hestia
in N ms".  It serves a directory made for it at start-up (one page, in a fresh
temporary directory removed on exit), never its working directory, so nothing
of the checkout or the state directory (C{.git/}, C{hestia.db}, the
configuration) can be fetched through C{/services/demo/}.
"""

from __future__ import annotations

import argparse
import functools
import html
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Hestia demo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}</style>
</head>
<body>
<h1>Hestia demo</h1>
<p id="started">This page was started on demand by Hestia in {elapsed_ms} ms.</p>
<p>The server behind it ({server}, pid {pid}) was not running until the first request
reached <code>/services/demo/</code>. Hestia started it, held the request until it answered,
and will stop it again after its <code>idle_timeout</code> with no request.</p>
<p><a href="/v1/ui/">The dashboard</a> shows it; so does
<code>curl http://localhost:8080/v1/services/demo/status</code>.</p>
</body>
</html>
"""


def process_age(now: float | None = None) -> float:
    """
    Seconds since this process was created (by Hestia's spawn), from /proc.

    Falls back to the time since this module was imported where /proc is missing.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # Field 22 (starttime, in clock ticks since boot), counted after the ")" that ends
        # the command name, which may itself hold spaces.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


def make_site(directory: Path, elapsed: float, server: str) -> Path:
    """Write the demo's only page into C{directory}."""
    page = PAGE.format(elapsed_ms=round(elapsed * 1000), server=html.escape(server), pid=os.getpid())
    (directory / "index.html").write_text(page, encoding="utf-8")
    return directory


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the site directory only; one log line per request on stderr."""

    server_version = "hestia-demo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hestia-demo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hestia-demo-") as site:
        handler = functools.partial(QuietHandler, directory=site)
        httpd = ThreadingHTTPServer((args.bind, args.port), handler)
        make_site(Path(site), process_age(), f"{args.bind}:{args.port}")

        def stop(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)  # so that the temporary directory is removed
        print(f"hestia-demo: serving {site} on http://{args.bind}:{args.port}/", file=sys.stderr, flush=True)
        try:
            httpd.serve_forever()
        finally:
            httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
