"""
What Hestia has started, kept in SQLite so that it survives the gateway.

A cloud VM that Hestia forgets keeps costing money, so the facts needed to
find it again (its state, its current URL, the Semaphore task in flight) are
written here, and written I{before} Hestia acts on them: callers wait for the
returned L{Deferred} first.  The event history (starts, stops, failures, with
durations) feeds C{GET /v1/services/<name>/events}.

SQLite is used from one worker thread (L{adbapi.ConnectionPool} with a single
connection), which keeps writes in order and the reactor thread free.  The
schema is versioned with C{PRAGMA user_version} and migrated on open.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.logger import Logger

from hestia.lifecycle import State, StateChange

log = Logger(namespace="hestia.state")

# Each entry migrates from version N to N+1; never edit a released entry.
MIGRATIONS: list[list[str]] = [
    [
        """
        CREATE TABLE services (
            name TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            state_since REAL NOT NULL,
            url TEXT,
            task_id INTEGER,
            last_request_at REAL,
            data TEXT NOT NULL DEFAULT '{}',
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            service TEXT NOT NULL,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            old_state TEXT,
            new_state TEXT,
            reason TEXT,
            duration REAL,
            error TEXT
        )
        """,
        "CREATE INDEX events_by_service ON events (service, id)",
    ],
    # Issue 16 (hestia.costs): running spans, for costs; first uses, for prewarm.
    [
        """
        CREATE TABLE running_spans (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            service TEXT NOT NULL,
            unit TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            checkpoint_at REAL NOT NULL,
            rate REAL NOT NULL DEFAULT 0,
            reason TEXT NOT NULL,
            woken_by TEXT,
            guess_seconds REAL
        )
        """,
        "CREATE INDEX running_spans_by_end ON running_spans (ended_at)",
        "CREATE UNIQUE INDEX running_spans_by_unit ON running_spans (unit, started_at)",
        """
        CREATE TABLE first_uses (
            service TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (service, at)
        )
        """,
        "CREATE TABLE accounting (key TEXT PRIMARY KEY, value REAL NOT NULL)",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)
EVENTS_KEPT_PER_SERVICE = 1000


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema of C{connection}'s database to L{SCHEMA_VERSION}; the version found."""
    return _migrate(connection)


def _migrate(connection: sqlite3.Connection) -> int:
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the state database has schema version {version}, newer than this Hestia's "
            f"{SCHEMA_VERSION}: upgrade Hestia or move the file away"
        )
    for target in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[target]:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {target + 1}")
    return int(version)


def event_kind(change: StateChange) -> str:
    """What a transition means to a person reading the history."""
    if change.new is State.STARTING:
        return "start"
    if change.new is State.READY:
        return "ready"
    if change.new is State.STOPPING:
        return "stop"
    if change.new is State.STOPPED:
        return "stopped"
    return "fail"


class StateStore:
    """
    The SQLite state file.

    @ivar path: the database file (or C{:memory:} in tests).
    """

    def __init__(self, path: str, pool: adbapi.ConnectionPool | None = None) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = pool or adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,  # One connection: writes stay ordered, SQLite stays unlocked.
            cp_openfun=self._configure,
            isolation_level=None,  # Autocommit; transactions are explicit where needed.
        )
        self._opened: Deferred[int] | None = None
        self._pending: set[Deferred[Any]] = set()

    @staticmethod
    def _configure(connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")  # A VM launched must be on disk.
        connection.execute("PRAGMA busy_timeout = 5000")

    def open(self) -> Deferred[int]:
        """Create or migrate the schema; fires with the version found."""
        if self._opened is None:
            self._opened = self._pool.runWithConnection(_migrate)
        return self._opened

    def track(self, write: Deferred[Any]) -> Deferred[Any]:
        """Remember a write until it ends, so that L{flush} can wait for it."""
        self._pending.add(write)

        def done(result: object) -> object:
            self._pending.discard(write)
            return result

        return write.addBoth(done)

    def flush(self) -> Deferred[Any]:
        """Fires once every tracked write has ended (at shutdown)."""
        return DeferredList([self._wait(write) for write in list(self._pending)])

    @staticmethod
    def _wait(write: Deferred[Any]) -> Deferred[None]:
        ended: Deferred[None] = Deferred()

        def passed(result: object) -> object:
            ended.callback(None)
            return result

        write.addBoth(passed)
        return ended

    @inlineCallbacks
    def interact(self, work: Callable[..., Any], *args: Any):  # type: ignore[no-untyped-def]
        """Run C{work(cursor, *args)} in one transaction on the database thread (hestia.costs)."""
        yield self.open()
        result = yield self._pool.runInteraction(work, *args)
        return result

    def close(self) -> None:
        if self._pool.running:
            self._pool.close()

    # -- services -------------------------------------------------------------

    @inlineCallbacks
    def save_service(  # type: ignore[no-untyped-def]
        self,
        name: str,
        state: str,
        state_since: float,
        *,
        url: str | None = None,
        task_id: int | None = None,
        last_request_at: float | None = None,
        data: dict[str, Any] | None = None,
        now: float,
    ):
        """
        Record a service's current facts; fires once they are on disk.

        Fields given as C{None} keep their stored value, except C{url} and
        C{task_id}, which a caller clears by passing C{clear=...} through
        L{clear_service_fields}.
        """
        yield self.open()
        yield self._pool.runOperation(
            """
            INSERT INTO services (name, state, state_since, url, task_id, last_request_at, data, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(name) DO UPDATE SET
                state = excluded.state,
                state_since = excluded.state_since,
                url = COALESCE(excluded.url, services.url),
                task_id = COALESCE(excluded.task_id, services.task_id),
                last_request_at = COALESCE(excluded.last_request_at, services.last_request_at),
                data = CASE WHEN excluded.data = '{}' THEN services.data ELSE excluded.data END,
                updated_at = excluded.updated_at
            """,
            (name, state, state_since, url, task_id, last_request_at, json.dumps(data or {}), now),
        )

    @inlineCallbacks
    def clear_service_fields(self, name: str, *fields: str):  # type: ignore[no-untyped-def]
        """Forget C{url}, C{task_id} or C{data} (a stopped VM has neither)."""
        allowed = {"url": "NULL", "task_id": "NULL", "data": "'{}'"}
        assignments = ", ".join(f"{field} = {allowed[field]}" for field in fields)
        yield self.open()
        yield self._pool.runOperation(f"UPDATE services SET {assignments} WHERE name = ?", (name,))  # noqa: S608

    @inlineCallbacks
    def load_services(self):  # type: ignore[no-untyped-def]
        """Every stored service, as C{{name: {state, url, task_id, ...}}}."""
        yield self.open()
        rows = yield self._pool.runQuery(
            "SELECT name, state, state_since, url, task_id, last_request_at, data, updated_at FROM services"
        )
        return {
            row[0]: {
                "state": row[1],
                "state_since": row[2],
                "url": row[3],
                "task_id": row[4],
                "last_request_at": row[5],
                "data": json.loads(row[6] or "{}"),
                "updated_at": row[7],
            }
            for row in rows
        }

    # -- events -----------------------------------------------------------------

    @inlineCallbacks
    def record_event(  # type: ignore[no-untyped-def]
        self,
        service: str,
        kind: str,
        at: float,
        *,
        old_state: str | None = None,
        new_state: str | None = None,
        reason: str | None = None,
        duration: float | None = None,
        error: str | None = None,
    ):
        yield self.open()

        def insert(transaction: Any) -> None:
            transaction.execute(
                "INSERT INTO events (service, at, kind, old_state, new_state, reason, duration, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (service, at, kind, old_state, new_state, reason, duration, error),
            )
            # Bounded history: the newest EVENTS_KEPT_PER_SERVICE per service.
            transaction.execute(
                "DELETE FROM events WHERE service = ? AND id <= ("
                " SELECT id FROM events WHERE service = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (service, service, EVENTS_KEPT_PER_SERVICE),
            )

        yield self._pool.runInteraction(insert)

    @inlineCallbacks
    def events(self, service: str, limit: int = 50):  # type: ignore[no-untyped-def]
        """The newest C{limit} events of C{service}, newest first."""
        yield self.open()
        rows = yield self._pool.runQuery(
            "SELECT id, at, kind, old_state, new_state, reason, duration, error FROM events"
            " WHERE service = ? ORDER BY id DESC LIMIT ?",
            (service, limit),
        )
        return [
            {
                "id": row[0],
                "at": row[1],
                "kind": row[2],
                "from": row[3],
                "to": row[4],
                "reason": row[5],
                "duration": row[6],
                "error": row[7],
            }
            for row in rows
        ]


def state_recorder(store: StateStore, now: Callable[[], float]) -> Callable[[StateChange], None]:
    """
    A lifecycle observer that writes every transition to C{store}.

    Write failures are logged, never raised into the lifecycle: a full disk
    must not stop the gateway from serving.
    """

    def record(change: StateChange) -> None:
        wrote = store.record_event(
            change.service,
            event_kind(change),
            change.at,
            old_state=change.old.value,
            new_state=change.new.value,
            reason=change.reason,
            duration=change.duration,
            error=change.error,
        )
        wrote.addCallback(
            lambda _: store.save_service(change.service, change.new.value, change.at, now=now())
        )
        wrote.addErrback(lambda failure: log.failure("cannot record {service}'s state", failure,
                                                     service=change.service))
        store.track(wrote)

    return record
