"""
Shared test configuration.

A test that skips because a tool is missing (podman, promtool, chromium...)
would count as passing.  Under CI (C{CI=true}) every skip is turned into a
failure instead, so a missing install step in C{.ci/run} cannot hide.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    for marker, meaning in (
        ("unit", "synchronous tests with Clock/MemoryReactor, no processes"),
        ("integration", "real Hestia and backend processes on loopback"),
        ("container", "needs the real Podman engine"),
        ("semaphore", "Semaphore UI backend against its test double"),
        ("browser", "headless Chromium"),
        ("contract", "a documented contract against the code: OpenAPI vs the live gateway, the "
                     "configuration reference vs the schema, the Semaphore double vs Semaphore's API spec"),
    ):
        config.addinivalue_line("markers", f"{marker}: {meaning}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def require(condition: bool, reason: str) -> None:
    """Skip locally when a tool is missing; under CI the skip becomes a failure."""
    if not condition:
        pytest.skip(reason)


# ---- integration: real Hestia processes (tests/support/hestiaproc.py) -------- begin ----
# Appended by the integration-test helper; keep this block self-contained.

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from support.hestiaproc import HestiaProcess, processes_marked, reap_leftovers, wait_for  # noqa: E402

StartHestia = Callable[..., HestiaProcess]


@pytest.fixture
def hestia(tmp_path: Path) -> Iterator[StartHestia]:
    """
    Start real C{twistd -n hestia} gateways: C{hestia(config, env=None, wait=True)}.

    Every gateway is stopped at the end of the test (SIGTERM, then SIGKILL of its
    group).  Then no process whose command line names the test's C{tmp_path}
    (every backend built with C{hestiaproc.backend_command} does) may be left:
    after a graceful stop that would be an orphan of Hestia's, and fails the test;
    whatever is found is killed either way.
    """
    started: list[HestiaProcess] = []

    def start(config: dict[str, Any] | None, env: dict[str, str] | None = None, *, wait: bool = True,
              **kwargs: Any) -> HestiaProcess:
        gateway = HestiaProcess(config, tmp_path / f"hestia-{len(started)}", env, **kwargs)
        started.append(gateway)
        return gateway.start(wait=wait)

    yield start
    graceful = True
    for gateway in started:
        gateway.stop()
        graceful = graceful and not gateway.killed
    marker = str(tmp_path)
    # Orphans are reparented and die asynchronously: give a SIGKILLed group a moment.
    wait_for(lambda: not processes_marked(marker), 2.0)
    leftovers = reap_leftovers(marker)
    assert not (graceful and leftovers), f"processes left behind after Hestia stopped: {leftovers}"


# ---- integration: real Hestia processes ------------------------------------ end ----


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """
    Close any SQLite pool a failed test left open.

    adbapi's worker thread is not a daemon: one pool left running keeps the
    interpreter alive after the last test, and the run hangs instead of ending.
    """
    import gc

    from twisted.enterprise import adbapi

    for candidate in gc.get_objects():
        try:
            if isinstance(candidate, adbapi.ConnectionPool) and candidate.running:
                candidate.close()
        except ReferenceError:  # A dead weak proxy: nothing to close.
            continue
