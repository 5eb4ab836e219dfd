"""The process entry point: command line, reactor, ``double.json`` once listening.

``python tests/support/semaphore_double --port 0 --token T --project-id 1 --state-dir DIR
[--scenario-file FILE]`` (or ``python -m support.semaphore_double ...`` with ``tests/``
on ``sys.path``) runs `main`.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

from .double import SemaphoreDouble
from .scenario import load_scenario_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Semaphore UI test double (see module docstring).")
    ap.add_argument("--port", type=int, required=True, help="0 picks a free port (see double.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--token", default="test-token")
    ap.add_argument("--project-id", type=int, default=1)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--scenario-file")
    ap.add_argument("--spec", help="the spec (default: $SEMAPHORE_API_DOCS or tests/support/semaphore_contract.yml)")
    ap.add_argument("--keep-vms-on-exit", action="store_true",
                    help="leave VM processes running on SIGTERM, to simulate a server restart")
    args = ap.parse_args(argv)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor  # zope interfaces confuse type checkers without mypy-zope
    scenario = copy.deepcopy(load_scenario_file(args.scenario_file)) if args.scenario_file else None
    double = SemaphoreDouble(token=args.token, state_dir=args.state_dir, project_id=args.project_id,
                             scenario=scenario, spec_path=args.spec, reactor=reactor,
                             keep_vms_on_exit=args.keep_vms_on_exit)
    listening: Any = double.listen(args.port, args.host)
    port = int(listening.getHost().port)
    double._write("double.json", {"port": port, "pid": os.getpid(), "url": f"http://{args.host}:{port}"})
    print(f"semaphore-double listening on http://{args.host}:{port}", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", double.shutdown)
    reactor.run()
    return 0
