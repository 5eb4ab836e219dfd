"""
A WebSocket echo backend built on the `websockets` package, run as a real subprocess.

    python tests/support/ws_backend.py --port N [--start-delay S]

`/echo` echoes every message; `/upper` answers text upper-cased; `/health` is plain
HTTP 200 for Hestia's health check; any other path is refused with 404 (a
failed upgrade).
"""

from __future__ import annotations

import argparse
import asyncio
import http
import signal
import sys
import time

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


async def handler(connection: ServerConnection) -> None:
    path = connection.request.path if connection.request else "/"
    async for message in connection:
        if path.startswith("/upper") and isinstance(message, str):
            await connection.send(message.upper())
        else:
            await connection.send(message)


def route(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/health":
        return connection.respond(http.HTTPStatus.OK, "ok\n")
    if not request.path.startswith(("/echo", "/upper")):
        return connection.respond(http.HTTPStatus.NOT_FOUND, "no websocket here\n")
    return None


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.start_delay)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(handler, "127.0.0.1", args.port, process_request=route, max_size=None):
        print(f"listening on 127.0.0.1:{args.port}", flush=True)
        await stop
    sys.exit(0)


if __name__ == "__main__":
    asyncio.run(main())
