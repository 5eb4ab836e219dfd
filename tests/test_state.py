"""
The SQLite state store, on a real file in a worker thread (trial runs the reactor).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hestia import state as state_module
from hestia.lifecycle import State, StateChange
from hestia.state import (
    SCHEMA_VERSION,
    StateStore,
    StateStoreError,
    StoreClosed,
    check_state_file,
    state_recorder,
)

pytestmark = pytest.mark.unit


class StateStoreTests(TestCase):
    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that would write below the work tree.
        directory = tempfile.mkdtemp(prefix="hestia-state-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = str(Path(directory) / "state" / "hestia.db")
        self.store = StateStore(self.path)
        self.addCleanup(self.store.close)

    def test_it_is_the_istatestore_backends_are_given(self) -> None:
        from zope.interface.verify import verifyObject

        from hestia.interfaces import IStateStore

        self.assertTrue(verifyObject(IStateStore, self.store))

    @inlineCallbacks
    def test_schema_is_created_and_versioned(self):  # type: ignore[no-untyped-def]
        found = yield self.store.open()
        self.assertEqual(found, 0)
        version = sqlite3.connect(self.path).execute("PRAGMA user_version").fetchone()[0]
        self.assertEqual(version, SCHEMA_VERSION)
        reopened = StateStore(self.path)
        self.addCleanup(reopened.close)
        self.assertEqual((yield reopened.open()), SCHEMA_VERSION)

    @inlineCallbacks
    def test_a_newer_schema_is_refused(self):  # type: ignore[no-untyped-def]
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(self.path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with self.assertRaises(RuntimeError):
            yield self.store.open()

    @inlineCallbacks
    def test_services_survive_a_reopen(self):  # type: ignore[no-untyped-def]
        yield self.store.save_service("gpu", "starting", 10.0, task_id=42, now=11.0)
        yield self.store.save_service("gpu", "ready", 20.0, url="http://10.0.0.5:11434", now=21.0)
        self.store.close()
        self.store = StateStore(self.path)
        # Every pool must be closed, or its worker thread keeps pytest from exiting.
        self.addCleanup(self.store.close)
        services = yield self.store.load_services()
        self.assertEqual(services["gpu"]["state"], "ready")
        self.assertEqual(services["gpu"]["task_id"], 42)
        self.assertEqual(services["gpu"]["url"], "http://10.0.0.5:11434")
        yield self.store.clear_service_fields("gpu", "url", "task_id")
        services = yield self.store.load_services()
        self.assertIsNone(services["gpu"]["url"])
        self.assertIsNone(services["gpu"]["task_id"])

    @inlineCallbacks
    def test_recorder_writes_the_history_newest_first(self):  # type: ignore[no-untyped-def]
        record = state_recorder(self.store, lambda: 100.0)
        record(StateChange("web", State.STOPPED, State.STARTING, "request", 1.0))
        record(StateChange("web", State.STARTING, State.READY, "started", 2.5, duration=1.5))
        record(StateChange("web", State.READY, State.STOPPING, "idle", 300.0))
        yield self.store.flush()
        events = yield self.store.events("web", limit=2)
        self.assertEqual([(e["kind"], e["reason"]) for e in events], [("stop", "idle"), ("ready", "started")])
        self.assertEqual(events[1]["duration"], 1.5)
        services = yield self.store.load_services()
        self.assertEqual(services["web"]["state"], "stopping")


    @inlineCallbacks
    def test_a_transition_is_recorded_whole_or_not_at_all(self):  # type: ignore[no-untyped-def]
        """
        The event and the service's state are one write. Before, they were two, and a gateway
        SIGKILLed between them left the history saying "ready" over a record saying "starting":
        the next gateway started again what was up (the flaky CI run of stop 25).
        Here the second half fails (a trigger refuses it), and the first half must not stay.
        """
        yield self.store.open()
        connection = sqlite3.connect(self.path)
        connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON services BEGIN SELECT RAISE(ABORT, 'full'); END")
        connection.commit()
        connection.close()
        record = state_recorder(self.store, lambda: 100.0)
        record(StateChange("web", State.STOPPED, State.STARTING, "request", 1.0))
        yield self.store.flush()
        self.assertEqual((yield self.store.events("web")), [])
        self.assertEqual((yield self.store.load_services()), {})
        self.flushLoggedErrors()

class LockedStateTests(TestCase):
    """
    Issue 12, hole 7: a lock held by another process is waited for a bounded
    time, and a closing store stops waiting at once (shutdown never hangs in SQLite).
    """

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="hestia-state-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = str(Path(directory) / "hestia.db")
        check_state_file(self.path)
        # Another process's lock: a connection of its own holding the write lock.
        self.other = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.addCleanup(self.other.close)

    def hold_lock(self) -> None:
        self.other.execute("BEGIN EXCLUSIVE")
        self.other.execute("INSERT INTO events (service, at, kind) VALUES ('x', 0, 'start')")
        self.addCleanup(lambda: self.other.in_transaction and self.other.execute("ROLLBACK"))

    @inlineCallbacks
    def test_a_write_waits_for_the_lock_a_bounded_time(self):  # type: ignore[no-untyped-def]
        store = StateStore(self.path, lock_timeout=0.3)
        self.addCleanup(store.close)
        yield store.open()
        self.hold_lock()
        with self.assertRaises(StateStoreError) as caught:
            yield store.record_event("web", "start", 1.0)
        self.assertIn("locked by another process for more than 0.3s", str(caught.exception))
        self.assertIn(self.path, str(caught.exception))
        self.other.execute("ROLLBACK")
        yield store.record_event("web", "start", 1.0)  # the lock gone, writes go through again
        self.assertEqual(len((yield store.events("web"))), 1)

    @inlineCallbacks
    def test_an_interaction_waits_for_the_lock_a_bounded_time(self):  # type: ignore[no-untyped-def]
        # Found attacking a running Hestia: the cost ledger's writes (interact)
        # bypassed the store's bounded wait and failed with SQLite's own
        # "database is locked", each logged as a critical traceback.
        store = StateStore(self.path, lock_timeout=0.3)
        self.addCleanup(store.close)
        yield store.open()
        self.hold_lock()

        def insert(cursor: Any, first: str, second: str) -> int:
            cursor.execute("INSERT INTO events (service, at, kind) VALUES (?, 1, 'start')", (first,))
            cursor.execute("INSERT INTO events (service, at, kind) VALUES (?, 2, 'start')", (second,))
            return 2

        with self.assertRaises(StateStoreError) as caught:
            yield store.interact(insert, "a", "b")
        self.assertIn("locked by another process for more than 0.3s", str(caught.exception))
        self.other.execute("ROLLBACK")
        self.assertEqual((yield store.interact(insert, "a", "b")), 2)  # one transaction, written once
        self.assertEqual(len((yield store.events("a"))), 1)
        self.assertEqual(len((yield store.events("b"))), 1)
        store.close()
        with self.assertRaises(StoreClosed):
            yield store.interact(insert, "c", "d")

    @inlineCallbacks
    def test_closing_stops_a_wait_for_the_lock(self):  # type: ignore[no-untyped-def]
        store = StateStore(self.path, lock_timeout=600)  # the old store would wait this long
        yield store.open()
        self.hold_lock()
        waiting = threading.Event()
        real = state_module._is_locked

        def seen(error: sqlite3.Error) -> bool:
            waiting.set()
            return real(error)

        self.patch(state_module, "_is_locked", seen)
        write = store.record_event("web", "start", 1.0)
        queued = store.save_service("web", "starting", 1.0, now=1.0)
        store.track(write)
        store.track(queued)
        self.assertTrue((yield deferToThread(waiting.wait, 30)), "the write never met the lock")
        store.close()  # joins the worker thread: returns only once the wait ended
        for pending in (write, queued):
            with self.assertRaises(StoreClosed):
                yield pending
        self.assertEqual(store.pending, 0)


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        (lambda path: path.mkdir(), "is not a regular file"),
        (lambda path: path.write_bytes(b"\x00garbage" * 512), "not a usable SQLite database"),
        (lambda path: sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}"),
         f"schema version {SCHEMA_VERSION + 7}, newer"),
    ],
    ids=["directory", "corrupt", "newer"],
)
def test_check_state_file_names_the_file_and_the_problem(tmp_path: Path, prepare: Any, expected: str) -> None:
    path = tmp_path / "hestia.db"
    prepare(path)
    with pytest.raises(StateStoreError) as caught:
        check_state_file(str(path))
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_state_file_creates_and_migrates(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "hestia.db"
    assert check_state_file(str(path)) == 0
    assert check_state_file(str(path)) == SCHEMA_VERSION
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_closed_store_answers_503_on_the_events_route_and_never_hangs(tmp_path: Path) -> None:
    from treq.testing import StubTreq
    from twisted.internet.task import Clock

    from hestia.api import ManagementAPI
    from hestia.gateway import Gateway
    from hestia.loader import parse_config
    from hestia.testing import FakeBackend

    path = str(tmp_path / "hestia.db")
    check_state_file(path)
    store = StateStore(path)
    store.close()  # shutting down: the worker thread is gone
    config = parse_config({"services": {"web": {"url": "http://w:1"}}}, "t.yml", {})
    gateway = Gateway(config, Clock(), build_backend=lambda service: FakeBackend(url=service.url,
                                                                                  has_lifecycle=False))
    client = StubTreq(ManagementAPI(gateway, store=store).resource())
    answered: list[Any] = []
    client.get("http://gw/services/web/events").addBoth(answered.append)
    client.flush()
    assert answered, "the events route never answered"
    response = answered[0]
    assert response.code == 503
    body: list[Any] = []
    response.json().addBoth(body.append)
    client.flush()
    assert "state database" in body[0]["error"] and body[0]["retry_after"] == 5
    with pytest.raises(StoreClosed):
        failed: list[Any] = []
        store.record_event("web", "start", 1.0).addErrback(failed.append)
        failed[0].raiseException()
