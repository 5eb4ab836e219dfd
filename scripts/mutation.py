"""
Mutation testing of Hestia's core (issue 21): `./scripts/dev.sh test mutation [MODULE...]`.

The tool is mutmut 3 (the `mutation` extra in setup.cfg).  The core modules are the
`only_mutate` list of setup.cfg's [mutmut] section, the one table of them; the tests it runs are
the fast unit tests named there (`pytest_add_cli_args_test_selection`, `-m unit`).  mutmut
records which tests cover each function and runs only those for a mutant, in a forked process:
a mutant costs a fraction of a second.

    scripts/mutation.py                     every core module, every mutant (long: see DEV_ENVIRONMENT.md)
    scripts/mutation.py queue headers       those modules
    scripts/mutation.py --sample 60 config  a fixed sample of 60 mutants (same seed, same sample
                                            while the source is unchanged: before/after figures)
    scripts/mutation.py --report lifecycle  only print the last results, run nothing

Printed: the survivors of each module (`mutmut show NAME` shows the change), then one line per
module: killed / checked and the score.  A mutant that is equivalent (no behaviour can tell it
from the original) is marked in the source with `# pragma: no mutate` and a reason; mutmut then
does not generate it.  Exit status 1 when a module scores below --floor (default 0: report only).
"""

from __future__ import annotations

import argparse
import configparser
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = [str(Path(sys.executable).with_name("mutmut"))]

KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests", "suspicious"}


def core_modules() -> dict[str, Path]:
    """The table: setup.cfg [mutmut] only_mutate, as {module name: source path}."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    paths = [line.strip() for line in parser.get("mutmut", "only_mutate").splitlines() if line.strip()]
    return {Path(p).stem: Path(p) for p in paths}


def dotted(path: Path) -> str:
    """src/hestia/queue.py -> hestia.queue (mutmut's mutant names start with it)."""
    parts = path.with_suffix("").parts
    return ".".join(parts[1:] if parts[0] == "src" else parts)


def mutmut(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(MUTMUT + list(args), cwd=ROOT, text=True, capture_output=True, check=False)


def results() -> dict[str, str]:
    """{mutant name: status} for every mutant generated so far (`mutmut results --all true`)."""
    out = mutmut("results", "--all", "true").stdout
    found = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def generate() -> None:
    """Bring mutants/ up to date with the source (mutmut regenerates changed files only)."""
    # mutmut has no "generate only" command: a run filtered on a name nothing has generates the
    # mutants and the test statistics, then stops on "nothing matches".
    mutmut("run", "--max-children", "1", "hestia.no-such-module.*")


def pragma_count(path: Path) -> int:
    return sum("pragma: no mutate" in line for line in (ROOT / path).read_text().splitlines())


def main() -> int:
    table = core_modules()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"core modules (default: all): {', '.join(table)}")
    ap.add_argument("--sample", type=int, default=0, help="at most N mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=21, help="seed of the sample")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("HESTIA_MUTATION_JOBS", "1")),
                    help="parallel mutants (default 1, or HESTIA_MUTATION_JOBS)")
    ap.add_argument("--report", action="store_true", help="print the last results, run nothing")
    ap.add_argument("--floor", type=float, default=0.0, help="fail when a module scores below this percent")
    args = ap.parse_args()
    unknown = [m for m in args.modules if m not in table]
    if unknown:
        ap.error(f"not a core module: {', '.join(unknown)} (the table is setup.cfg [mutmut] only_mutate)")
    modules = args.modules or list(table)

    if not args.report:
        generate()
    status = results()
    chosen: dict[str, list[str]] = {}
    for module in modules:
        prefix = dotted(table[module]) + "."
        names = sorted(n for n in status if n.startswith(prefix))
        if args.sample and len(names) > args.sample:
            names = sorted(random.Random(args.seed).sample(names, args.sample))  # noqa: S311 -- a sample, not a secret
        chosen[module] = names
        if not args.report and names:
            print(f"==> {module}: {len(names)} mutants", file=sys.stderr, flush=True)
            run = mutmut("run", "--max-children", str(args.jobs), *names)
            if run.returncode != 0 and "Failed to run clean test" in run.stdout:
                print(run.stdout[-4000:], file=sys.stderr)
                return 2
    status = results()

    rows = []
    failed = False
    for module in modules:
        counts = Counter(status.get(n, "not checked") for n in chosen[module])
        killed = sum(counts[s] for s in KILLED)
        survivors = [n for n in chosen[module] if status.get(n) in SURVIVED]
        checked = killed + len(survivors)
        score = 100.0 * killed / checked if checked else 100.0
        failed |= score < args.floor
        if survivors:
            print(f"\n{module}: {len(survivors)} survivors (`.venv/bin/mutmut show NAME`)")
            for name in survivors:
                print(f"    {name}: {status[name]}")
        rows.append((module, killed, checked, score, pragma_count(table[module]), counts["not checked"]))

    print(f"\n{'module':<10} {'killed':>7} {'checked':>8} {'score':>7} {'equivalent':>11}")
    for module, killed, checked, score, equivalent, unchecked in rows:
        note = f"  ({unchecked} not checked)" if unchecked else ""
        print(f"{module:<10} {killed:>7} {checked:>8} {score:>6.1f}% {equivalent:>11}{note}")
    print(f"(sample of {args.sample} per module, seed {args.seed})" if args.sample else "(every mutant)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
