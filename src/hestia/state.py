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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hestia.coroutines import Outcome, as_deferred
from hestia.interfaces import IStateStore
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


_UPSERT_SERVICE = """
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
"""


def _in_transaction(connection: Any, work: Callable[[], None]) -> None:
    """C{work()} inside C{BEGIN IMMEDIATE}, committed whole or rolled back whole."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        work()
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _insert_event(connection: Any, event: tuple[Any, ...]) -> None:
    connection.execute(
        "INSERT INTO events (service, at, kind, old_state, new_state, reason, duration, error)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        event,
    )
    # Bounded history: the newest EVENTS_KEPT_PER_SERVICE per service.
    connection.execute(
        "DELETE FROM events WHERE service = ? AND id <= ("
        " SELECT id FROM events WHERE service = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (event[0], event[0], EVENTS_KEPT_PER_SERVICE),
    )


class StateStoreError(Exception):
    """
    The state file cannot be used; C{str()} is one line naming the file.

    Raised before start-up (L{check_state_file}), and by an operation that
    found the file locked for longer than the store waits.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class StoreClosed(Exception):
    """The store was closed (shutdown) before this operation could run."""


# How long one operation waits for a lock held by another process before it
# fails (SQLite's own busy wait is kept short, so that a shutdown can stop
# the wait between two tries instead of being stuck in SQLite).
LOCK_TIMEOUT = 5.0
_LOCK_RETRY = 0.02  # seconds per SQLite busy wait, between checks for closing


def _is_locked(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(error)


def _configure(connection: sqlite3.Connection) -> None:
    connection.execute(f"PRAGMA busy_timeout = {int(_LOCK_RETRY * 1000)}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")  # A VM launched must be on disk.


def _problem(error: Exception) -> str:
    """What is wrong with the file, worded for the operator."""
    text = str(error)
    corrupt = "not a database" in text or "malformed" in text
    if corrupt and isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError):
        return f"not a usable SQLite database ({text}): move it away or restore a backup"
    if "readonly" in text or "read-only" in text:
        return f"cannot write to it ({text}): check the file's and its directory's permissions"
    if "unable to open" in text:
        return f"cannot open it ({text}): check that its directory exists and is writable"
    return text


def retry_while_locked(
    work: Callable[[], Any], path: str, lock_timeout: float, closing: Callable[[], bool] = lambda: False
) -> Any:
    """
    Run C{work}, again while another process holds a lock on C{path}, for at
    most C{lock_timeout} seconds; give up at once when C{closing()} is true.
    """
    deadline = time.monotonic() + lock_timeout
    while True:
        if closing():
            raise StoreClosed(path)
        try:
            return work()
        except sqlite3.OperationalError as error:
            if not _is_locked(error):
                raise
            if time.monotonic() >= deadline:
                raise StateStoreError(
                    path, f"locked by another process for more than {lock_timeout:g}s "
                    "(is another Hestia using this state_path?)"
                ) from None
            # SQLite's busy_timeout has already waited _LOCK_RETRY.


def check_state_file(path: str, lock_timeout: float = LOCK_TIMEOUT) -> int:
    """
    Make sure the state file can be used, before anything runs (synchronous).

    Creates the directory and the file, migrates the schema, and takes the
    write lock once: a directory in the file's place, a corrupt file, a
    read-only place, a newer schema or a lock held by another process for
    longer than C{lock_timeout} is a L{StateStoreError} naming the file.

    @return: the schema version found.
    """
    if path == ":memory:":
        return 0
    file = Path(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StateStoreError(
            path, f"cannot create its directory {str(file.parent)!r}: {error.strerror or error}"
        ) from None
    if file.exists() and not file.is_file():
        raise StateStoreError(path, "is not a regular file (a directory?): give server.state_path a file")
    try:
        connection = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as error:
        raise StateStoreError(path, _problem(error)) from None
    try:
        return int(retry_while_locked(lambda: _check_with(connection), path, lock_timeout))
    except (sqlite3.Error, RuntimeError) as error:
        raise StateStoreError(path, _problem(error)) from None
    finally:
        connection.close()


def _check_with(connection: sqlite3.Connection) -> int:
    _configure(connection)
    result = connection.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise sqlite3.DatabaseError(f"database disk image is malformed ({result[0] if result else '?'})")
    # The write lock, and a write, prove the file and its place writable.
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = _migrate(connection)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return version


@implementer(IStateStore)
class StateStore:
    """
    The SQLite state file.

    Every operation runs in the pool's one worker thread, retrying while
    another process holds a lock, for at most C{lock_timeout} seconds; after
    L{close} began, operations that have not started yet do not touch SQLite
    at all, and one that waits for a lock gives up within C{_LOCK_RETRY}.
    So a shutdown never waits on SQLite for long, whatever it does.

    @ivar path: the database file (or C{:memory:} in tests).
    """

    def __init__(self, path: str, pool: adbapi.ConnectionPool | None = None,
                 lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self._pool = pool or adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,  # One connection: writes stay ordered, SQLite stays unlocked.
            cp_openfun=_configure,
            isolation_level=None,  # Autocommit; transactions are explicit where needed.
        )
        # The one schema check, read by every caller; each waits on its own Deferred,
        # so a caller that gives up (a client that left) cancels nothing for the others.
        self._opened: Outcome[int] | None = None
        self._pending: set[Deferred[Any]] = set()
        self._closing = False

    # -- running ------------------------------------------------------------------

    def _retry(self, work: Callable[[], Any]) -> Any:
        return retry_while_locked(work, self.path, self.lock_timeout, lambda: self._closing)

    def _run(self, work: Callable[[Any], Any]) -> Deferred[Any]:
        """C{work(connection)} in the worker thread, with L{_retry}'s bounded waits."""
        if self._closing:
            # The worker thread is gone or going: queued work would never run.
            return fail(StoreClosed(self.path))
        return self._pool.runWithConnection(lambda connection: self._retry(lambda: work(connection)))

    def open(self) -> Deferred[int]:
        """Create or migrate the schema; fires with the version found."""
        if self._opened is None:
            opening: Deferred[int] | None = None
            if self.path != ":memory:":
                try:
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    opening = fail(StateStoreError(self.path, f"cannot create its directory: {error}"))
            self._opened = Outcome(opening or self._run(_migrate))
        return self._opened.wait()

    def track(self, write: Deferred[Any]) -> Deferred[Any]:
        """Remember a write until it ends, so that L{flush} can wait for it."""
        self._pending.add(write)

        def done(result: object) -> object:
            self._pending.discard(write)
            return result

        return write.addBoth(done)

    def flush(self, timeout: float | None = None, reactor: IReactorTime | None = None) -> Deferred[Any]:
        """
        Fires once every tracked write has ended (at shutdown), or after
        C{timeout} seconds on C{reactor}, whichever comes first.
        """
        ended: Deferred[Any] = DeferredList([self._wait(write) for write in list(self._pending)], consumeErrors=True)
        if timeout is not None and reactor is not None and self._pending:
            ended.addTimeout(max(timeout, 0.0), reactor, onTimeoutCancel=lambda result, after: None)
        return ended

    @property
    def pending(self) -> int:
        """How many tracked writes have not ended yet."""
        return len(self._pending)

    @staticmethod
    def _wait(write: Deferred[Any]) -> Deferred[None]:
        ended: Deferred[None] = Deferred()

        def passed(result: object) -> object:
            if not ended.called:
                ended.callback(None)
            return result

        write.addBoth(passed)
        return ended

    @as_deferred
    async def interact(self, work: Callable[..., Any], *args: Any) -> Any:
        """
        Run C{work(cursor, *args)} in one transaction on the database thread (hestia.costs).

        With the same bounded wait for a lock as every other operation (a
        L{StateStoreError} after C{lock_timeout}, L{StoreClosed} once closing):
        a try that meets the lock is rolled back before the next, so a
        transaction of several statements is written once.
        """
        await self.open()

        def transaction(connection: Any) -> Any:
            cursor = connection.cursor()
            try:
                return work(cursor, *args)
            except sqlite3.OperationalError:
                connection.rollback()
                raise
            finally:
                cursor.close()

        result = await self._run(transaction)  # runWithConnection commits it.
        return result

    def close(self) -> None:
        """
        Stop the worker thread.  Operations not started yet are dropped (they
        fail with L{StoreClosed}); one waiting for a lock gives up at its next
        try, so the thread's join takes at most one short SQLite wait.
        """
        self._closing = True
        if self._pool.running:
            self._pool.close()

    def _execute(self, statement: str, parameters: tuple[Any, ...] = ()) -> Deferred[None]:
        def execute(connection: Any) -> None:
            connection.execute(statement, parameters)

        return self._run(execute)

    def _query(self, statement: str, parameters: tuple[Any, ...] = ()) -> Deferred[list[Any]]:
        return self._run(lambda connection: connection.execute(statement, parameters).fetchall())

    # -- services -------------------------------------------------------------

    @as_deferred
    async def save_service(
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
    ) -> None:
        """
        Record a service's current facts; fires once they are on disk.

        Fields given as C{None} keep their stored value, except C{url} and
        C{task_id}, which a caller clears by passing C{clear=...} through
        L{clear_service_fields}.
        """
        await self.open()
        parameters = (name, state, state_since, url, task_id, last_request_at, json.dumps(data or {}), now)
        await self._execute(_UPSERT_SERVICE, parameters)

    @as_deferred
    async def clear_service_fields(self, name: str, *fields: str) -> None:
        """Forget C{url}, C{task_id} or C{data} (a stopped VM has neither)."""
        allowed = {"url": "NULL", "task_id": "NULL", "data": "'{}'"}
        assignments = ", ".join(f"{field} = {allowed[field]}" for field in fields)
        await self.open()
        await self._execute(f"UPDATE services SET {assignments} WHERE name = ?", (name,))  # noqa: S608

    @as_deferred
    async def load_services(self) -> dict[str, dict[str, Any]]:
        """Every stored service, as C{{name: {state, url, task_id, ...}}}."""
        await self.open()
        rows = await self._query(
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

    @as_deferred
    async def record_event(
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
    ) -> Any:
        await self.open()
        event = (service, at, kind, old_state, new_state, reason, duration, error)
        await self._run(lambda transaction: _in_transaction(transaction, lambda: _insert_event(transaction, event)))

    @as_deferred
    async def record_transition(self, change: StateChange, now: float) -> Any:
        """
        Record C{change} as an event and as the service's state, in one
        transaction: a gateway killed between the two writes would otherwise
        leave a history saying "ready" over a record saying "starting", and
        the next gateway would start again what was already up.
        """
        await self.open()
        event = (change.service, change.at, event_kind(change), change.old.value, change.new.value,
                 change.reason, change.duration, change.error)
        facts = (change.service, change.new.value, change.at, None, None, None, "{}", now)

        def write(transaction: Any) -> None:
            _insert_event(transaction, event)
            transaction.execute(_UPSERT_SERVICE, facts)

        await self._run(lambda transaction: _in_transaction(transaction, lambda: write(transaction)))

    @as_deferred
    async def events(self, service: str, limit: int = 50) -> Any:
        """The newest C{limit} events of C{service}, newest first."""
        await self.open()
        rows = await self._query(
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
        wrote = store.record_transition(change, now())
        wrote.addErrback(_log_write_failure, change.service)
        store.track(wrote)

    return record


def _log_write_failure(failure: Failure, service: str) -> None:
    """A locked file or a closing store is one line; anything else shows its traceback."""
    if failure.check(StateStoreError, StoreClosed):
        log.error("cannot record {service}'s state: {problem}", service=service,
                  problem=f"{failure.value} (store closed)" if failure.check(StoreClosed) else failure.value)
        return
    log.failure("cannot record {service}'s state", failure, service=service)
