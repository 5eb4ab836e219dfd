"""
Start coverage.py in every Python process of a coverage run.

``./scripts/dev.sh test coverage`` puts this directory on ``PYTHONPATH`` and
sets ``COVERAGE_PROCESS_START`` to the repository's ``.coveragerc``; both are
inherited by every process the tests start (twistd gateways, backends, the
Semaphore double), so each one measures itself and writes its own data file
(``parallel = True``), which ``coverage combine`` merges.  (coverage 7.10+
installs an ``a1_coverage.pth`` that starts it from that variable too; this
file then only adds what follows.)

A twistd stopped by SIGTERM shuts down cleanly and then ends itself with that
same signal (``twisted.application.app._exitWithSignal``: default handler,
``os.kill(os.getpid(), sig)``): no ``atexit`` runs, so coverage would lose the
gateway's data.  ``os.kill`` of the process itself with a terminating signal
therefore saves the data first.  Outside a coverage run this file does nothing.
"""

from __future__ import annotations

import os
import signal

_TERMINATING = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}


def _start() -> None:
    if not os.environ.get("COVERAGE_PROCESS_START"):
        return
    try:
        import coverage
    except ImportError:  # a Python without coverage (the system's python3 running a demo backend)
        return
    coverage.process_startup()  # a no-op when coverage's own a1_coverage.pth has started it already
    measuring = getattr(coverage.process_startup, "coverage", None)  # the instance it started
    if measuring is None:
        return
    kill = os.kill

    def kill_saving_coverage(pid: int, sig: int) -> None:
        if pid == os.getpid() and sig in _TERMINATING and signal.getsignal(sig) == signal.SIG_DFL:
            try:
                measuring.stop()
                measuring.save()
            except Exception:  # noqa: BLE001, S110 - the process is ending either way
                pass
        kill(pid, sig)

    os.kill = kill_saving_coverage


_start()
