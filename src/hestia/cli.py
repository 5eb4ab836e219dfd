"""
The C{hestia} command: a small client of the C{/v1} management API.

::

    hestia status [NAME]          a table of services (or one service)
    hestia start NAME [--wait]    start; with --wait, a live progress line until ready
    hestia stop NAME
    hestia restart NAME           drain, stop and start with the current settings
    hestia logs NAME [-f] [--tail N]
    hestia check-config [FILE]    validate a configuration without starting anything
    hestia costs [--period P]     running time, cost and savings per service (day, week, month, all)

It talks to C{$HESTIA_URL} (default C{http://localhost:8080}) with
C{$HESTIA_TOKEN} as a bearer token when set.  It uses only the standard
library's C{urllib}: a command-line client needs no reactor.

Exit codes say what happened, so scripts can branch on them (L{Exit}).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Any, NoReturn

from hestia import __version__

DEFAULT_URL = "http://localhost:8080"


class Exit(enum.IntEnum):
    """The command's exit status."""

    OK = 0
    FAILED = 1  # the gateway answered, and the operation failed (start failed, ...)
    USAGE = 2  # bad arguments, or an invalid configuration (check-config)
    NOT_FOUND = 3  # no such service (or this gateway lacks the route)
    AUTH = 4  # 401/403: set HESTIA_TOKEN
    UNREACHABLE = 5  # no gateway answering at HESTIA_URL
    TIMEOUT = 6  # start --wait gave up waiting


class CommandError(Exception):
    """Ends the command with a message on stderr and an exit status."""

    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """A tiny JSON client of C{/v1}; every failure becomes a L{CommandError}."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0, url_from: str = "HESTIA_URL") -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise CommandError(f"{url_from} must be an http:// or https:// URL, not {url!r}", Exit.USAGE)
        self.base = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # Loopback and LAN gateways: a proxy from the environment would only get in the way.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def open(self, method: str, path: str, timeout: float | None = None) -> Any:
        # The scheme was checked in __init__: only http(s) is ever opened.
        request = urllib.request.Request(self.base + path, method=method)  # noqa: S310
        request.add_header("Accept", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return self._opener.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as error:
            raise self._http_error(error, path) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CommandError(
                f"cannot reach Hestia at {self.base}: {reason} (is it running? set HESTIA_URL)", Exit.UNREACHABLE
            ) from None

    def json(self, method: str, path: str, timeout: float | None = None) -> Any:
        with self.open(method, path, timeout) as response:
            return json.loads(response.read() or b"null")

    def _http_error(self, error: urllib.error.HTTPError, path: str) -> CommandError:
        try:
            body = json.loads(error.read() or b"null")
        except ValueError:
            body = None
        message = body.get("error") if isinstance(body, dict) else None
        if message is None and error.code not in (401, 403):
            # Not Hestia's JSON error: another server has the port (HESTIA_URL points elsewhere).
            return CommandError(
                f"{self.base} is not a Hestia gateway: {path} answered HTTP {error.code} {error.reason}, "
                "not Hestia's JSON (set HESTIA_URL)", Exit.UNREACHABLE,
            )
        message = message or f"HTTP {error.code} {error.reason}"
        if error.code in (401, 403):
            hint = "" if self.token else " (set HESTIA_TOKEN)"
            return CommandError(f"not authorised: {message}{hint}", Exit.AUTH)
        if error.code == 404:
            service = body.get("service") if isinstance(body, dict) else None
            return CommandError(f"{service + ': ' if service else ''}{message}", Exit.NOT_FOUND)
        if isinstance(body, dict) and body.get("service"):
            message = f"{body['service']}: {message}"
            if body.get("detail"):
                message += "\n  " + "\n  ".join(str(line) for line in body["detail"][-10:])
        return CommandError(message, Exit.FAILED)


# -- formatting -------------------------------------------------------------------


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def _ago(value: str | None, now: float) -> str:
    at = _parse_time(value)
    return "-" if at is None else human_duration(now - at) + " ago"


def status_table(services: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """The services as an aligned text table, one row each."""
    now = time.time() if now is None else now
    header = ("NAME", "STATE", "BACKEND", "UPTIME", "LAST REQUEST", "IN FLIGHT", "QUEUED", "LAST ERROR")
    rows = [header]
    for service in services:
        since = _parse_time(service.get("state_since"))
        uptime = human_duration(now - since) if service.get("state") == "ready" and since else "-"
        error = (service.get("last_error") or "").splitlines()[0:1]
        rows.append(
            (
                str(service.get("name", "?")),
                str(service.get("state", "?")),
                str(service.get("backend", "?")),
                uptime,
                _ago(service.get("last_request_at"), now),
                str(service.get("in_flight", 0)),
                str(service.get("queued", 0)),
                (error[0][:60] if error else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def costs_table(report: dict[str, Any]) -> str:
    """C{GET /v1/costs} as an aligned text table, with a total row."""
    currency = str(report.get("currency", ""))
    header = ("NAME", "RUNNING", f"COST {currency}", f"ALWAYS ON {currency}", f"SAVED {currency}",
              "STARTS", "COLD", "PREWARM")
    rows = [header]
    totals = [0.0, 0.0, 0.0, 0.0]
    for entry in report.get("services", []):
        numbers = [float(entry.get(key) or 0) for key in ("running_seconds", "cost", "always_on_cost", "saved")]
        totals = [a + b for a, b in zip(totals, numbers, strict=True)]
        rows.append((str(entry.get("name", "?")), human_duration(numbers[0]), f"{numbers[1]:.2f}",
                     f"{numbers[2]:.2f}", f"{numbers[3]:.2f}", str(entry.get("starts", 0)),
                     str(entry.get("cold_starts", 0)), str(entry.get("prewarm_starts", 0))))
    rows.append(("TOTAL", human_duration(totals[0]), f"{totals[1]:.2f}", f"{totals[2]:.2f}", f"{totals[3]:.2f}",
                 "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return f"since {report.get('since')}\n" + "\n".join(lines)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# -- commands ----------------------------------------------------------------------


def cmd_status(client: Client, args: argparse.Namespace, out: IO[str]) -> Exit:
    if args.name:
        services = [client.json("GET", f"/v1/services/{_quote(args.name)}/status")]
    else:
        services = client.json("GET", "/v1/services").get("services", [])
    if args.json:
        out.write(json.dumps(services if not args.name else services[0], indent=2) + "\n")
    else:
        out.write(status_table(services) + "\n")
    return Exit.OK


def cmd_start(client: Client, args: argparse.Namespace, out: IO[str]) -> Exit:
    name = _quote(args.name)
    status = client.json("POST", f"/v1/services/{name}/start")
    if not args.wait:
        out.write(f"{args.name}: {status.get('state')}\n")
        return Exit.OK
    if status.get("state") == "ready":
        # Ready before this start: its last_start_duration is an older start's.
        out.write(f"{args.name}: already running\n")
        return Exit.OK
    timeout = args.timeout if args.timeout is not None else float(status.get("start_timeout") or 120) + 10
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    live = out.isatty()
    last_state = None
    while True:
        state = status.get("state")
        if state == "ready":
            took = status.get("last_start_duration")
            line = f"{args.name}: ready" + (f" (started in {took:.1f}s)" if isinstance(took, (int, float)) else "")
            out.write(("\r\033[K" if live else "") + line + "\n")
            return Exit.OK
        if state == "failed":
            if live:
                out.write("\r\033[K")
            reason = status.get("last_error") or status.get("state_reason") or "unknown reason"
            detail = status.get("last_error_detail") or []
            raise CommandError(
                f"{args.name}: start failed: {reason}" + "".join(f"\n  {line}" for line in detail[-10:]),
                Exit.FAILED,
            )
        if state == "stopped" and last_state not in (None, "stopped"):
            raise CommandError(f"{args.name}: stopped while starting ({status.get('state_reason')})", Exit.FAILED)
        elapsed = time.monotonic() - began
        typical = status.get("last_start_duration")
        line = f"{args.name}: {state} {elapsed:.1f}s" + (
            f" (typically {typical:.1f}s)" if isinstance(typical, (int, float)) else ""
        )
        if live:
            out.write("\r\033[K" + line)
            out.flush()
        elif state != last_state:
            out.write(line + "\n")
            out.flush()
        last_state = state
        if time.monotonic() >= deadline:
            if live:
                out.write("\n")
            raise CommandError(f"{args.name}: not ready after {timeout:.0f}s (still {state})", Exit.TIMEOUT)
        time.sleep(0.2)  # A polling interval for a person watching, not a synchronisation.
        status = client.json("GET", f"/v1/services/{name}/status")


def cmd_stop(client: Client, args: argparse.Namespace, out: IO[str]) -> Exit:
    status = client.json("POST", f"/v1/services/{_quote(args.name)}/stop")
    out.write(f"{args.name}: {status.get('state')}\n")
    return Exit.OK


def cmd_restart(client: Client, args: argparse.Namespace, out: IO[str]) -> Exit:
    name = _quote(args.name)
    before = client.json("GET", f"/v1/services/{name}/status")
    # Draining waits up to stop_timeout, then a whole start: give it both.
    timeout = args.timeout if args.timeout is not None else float(before.get("start_timeout") or 120) + 60
    status = client.json("POST", f"/v1/services/{name}/restart?wait=true", timeout=timeout)
    applied = before.get("pending_changes") or []
    note = f" with new {', '.join(applied)}" if applied else ""
    out.write(f"{args.name}: {status.get('state')} (restarted{note})\n")
    return Exit.OK


def cmd_logs(client: Client, args: argparse.Namespace, out: IO[str]) -> Exit:
    query = urllib.parse.urlencode({"tail": args.tail, "follow": "1" if args.follow else "0"})
    path = f"/v1/services/{_quote(args.name)}/logs?{query}"
    try:
        response = client.open("GET", path, timeout=None if not args.follow else 3600 * 24)
    except CommandError as error:
        if error.code is Exit.NOT_FOUND and "no such route" in str(error):
            raise CommandError("this Hestia has no logs endpoint (/v1/services/<name>/logs)", Exit.NOT_FOUND) from None
        raise
    with response:
        kind = response.headers.get("content-type", "")
        if "json" in kind and not args.follow:
            _print_log_document(json.loads(response.read() or b"null"), out)
            return Exit.OK
        try:
            for raw in response:
                line = raw.decode("utf-8", "replace")
                if "event-stream" in kind:
                    if not line.startswith("data:"):
                        continue
                    line = _log_line(line[5:].strip()) + "\n"
                elif "json" in kind:
                    line = _log_line(line.strip()) + "\n"
                out.write(line)
                out.flush()
        except (KeyboardInterrupt, TimeoutError):
            return Exit.OK
    if args.follow:
        # The gateway never ends a follow: the connection closed under it (stopped, restarted).
        raise CommandError(f"{args.name}: the gateway closed the log stream (did it stop?)", Exit.UNREACHABLE)
    return Exit.OK


def _log_line(text: str) -> str:
    """A JSON log entry as one readable line; other text as it is."""
    try:
        entry = json.loads(text)
    except ValueError:
        return text
    if isinstance(entry, dict):
        for key in ("line", "text", "message", "msg"):
            if isinstance(entry.get(key), str):
                prefix = f"{entry['stream']}: " if isinstance(entry.get("stream"), str) else ""
                return prefix + entry[key]
    return text if isinstance(entry, (dict, list)) else str(entry)


def _print_log_document(document: Any, out: IO[str]) -> None:
    lines = document.get("lines", document.get("logs", [])) if isinstance(document, dict) else document
    for entry in lines or []:
        out.write((entry if isinstance(entry, str) else _log_line(json.dumps(entry))) + "\n")


def cmd_check_config(args: argparse.Namespace, out: IO[str]) -> Exit:
    from hestia.config import ConfigError, describe_command
    from hestia.preflight import load_checked

    try:
        # The daemon's own checks (token sources, listen endpoints too).
        config = load_checked(args.file)
    except ConfigError as error:
        # Word for word what `twistd hestia` says before refusing to start.
        raise CommandError(f"config error: {error}", Exit.USAGE) from None
    out.write(f"{config.source}: OK, {len(config.services)} service(s), listening on {config.server.listen}\n")
    for service in config.services.values():
        how = describe_command(service.command) or service.backend
        out.write(f"  {service.name}: {service.backend} -> {service.url}  ({how})\n")
    return Exit.OK


def cmd_costs(client: Client, args: argparse.Namespace, out: IO[str]) -> Exit:
    report = client.json("GET", f"/v1/costs?period={_quote(args.period)}")
    out.write((json.dumps(report, indent=2) if args.json else costs_table(report)) + "\n")
    return Exit.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hestia",
        description="Talk to a running Hestia gateway ($HESTIA_URL, token $HESTIA_TOKEN).",
        epilog="exit codes: 0 ok, 1 failed, 2 usage/config error, 3 not found, 4 not authorised, "
        "5 gateway unreachable, 6 timed out",
    )
    parser.add_argument("--version", action="version", version=f"hestia {__version__}")
    parser.add_argument("--url", default=None, help=f"gateway URL (default $HESTIA_URL or {DEFAULT_URL})")
    parser.add_argument("--token", default=None, help="admin token (default $HESTIA_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="services and their states")
    status.add_argument("name", nargs="?", metavar="NAME")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    start = commands.add_parser("start", help="start a service")
    start.add_argument("name", metavar="NAME")
    start.add_argument("--wait", action="store_true", help="wait until ready, showing progress")
    start.add_argument("--timeout", type=float, default=None, help="seconds to wait (default start_timeout + 10)")

    stop = commands.add_parser("stop", help="stop a service")
    stop.add_argument("name", metavar="NAME")

    restart = commands.add_parser("restart", help="restart a service, applying a pending configuration change")
    restart.add_argument("name", metavar="NAME")
    restart.add_argument("--timeout", type=float, default=None, help="seconds to wait (default start_timeout + 60)")

    logs = commands.add_parser("logs", help="a service's recent output")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--tail", type=int, default=100, help="lines of history (default 100)")

    costs = commands.add_parser("costs", help="running time, cost and savings per service")
    costs.add_argument("--period", choices=("day", "week", "month", "all"), default="all")
    costs.add_argument("--json", action="store_true", help="print the raw JSON")

    check = commands.add_parser("check-config", help="validate a configuration file without starting")
    check.add_argument("file", nargs="?", metavar="FILE", help="default $HESTIA_CONFIG or ./hestia_config.yml")
    return parser


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            return int(cmd_check_config(args, out))
        client = Client(
            args.url or os.environ.get("HESTIA_URL") or DEFAULT_URL,
            args.token if args.token is not None else os.environ.get("HESTIA_TOKEN"),
            url_from="--url" if args.url else "HESTIA_URL",  # the one to correct
        )
        handler = {"status": cmd_status, "start": cmd_start, "stop": cmd_stop, "restart": cmd_restart,
                   "logs": cmd_logs, "costs": cmd_costs}[args.command]
        return int(handler(client, args, out))
    except CommandError as error:
        err.write(f"hestia: {error}\n")
        return int(error.code)
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    run()
