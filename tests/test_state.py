"""
The SQLite state store, on a real file in a worker thread (trial runs the reactor).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from hestia.lifecycle import State, StateChange
from hestia.state import SCHEMA_VERSION, StateStore, state_recorder

pytestmark = pytest.mark.unit


class StateStoreTests(TestCase):
    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that would write below the work tree.
        directory = tempfile.mkdtemp(prefix="hestia-state-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = str(Path(directory) / "state" / "hestia.db")
        self.store = StateStore(self.path)
        self.addCleanup(self.store.close)

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
