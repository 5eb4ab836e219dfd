#!/usr/bin/env bash
# Hestia's developer entry point: the README's two commands and a few helpers.
#
#   ./scripts/dev.sh setup        virtualenv + Hestia installed in it (editable); says what it
#                                 installed and what to try next
#   ./scripts/dev.sh run          setup, then run Hestia on hestia_config.yml (foreground), applying
#                                 every saved change of the file (--watch-config)
#   ./scripts/dev.sh test [SUITE] every test, lint and type check (SUITE: unit, integration, browser,
#                                 container, semaphore, contract, coverage, lint, or a pytest -k expression)
#   ./scripts/dev.sh status       the running Hestia's services as a table (`hestia status`)
#   ./scripts/dev.sh stop         stop a Hestia started by `run` (--engine: and the test engine)
#
# Environment: HESTIA_CONFIG (default ./hestia_config.yml), HESTIA_LISTEN, PYTHON (default python3),
# HESTIA_URL for `status` (default http://localhost:8080), HESTIA_WATCH_CONFIG=0 to run without
# watching the file, HESTIA_RUN_DIR (the pidfile's directory, default ./.run).
# DEV_ENVIRONMENT.md is the whole development guide.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
RUN_DIR="${HESTIA_RUN_DIR:-$ROOT/.run}"
cd "$ROOT"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup() {
  if [ ! -x "$PY" ]; then
    say "creating virtualenv in .venv"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  local stamp="$VENV/.hestia-installed"
  if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing Hestia and its test tools into .venv"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e ".[test,lint,dev]"
    # The example third-party routing strategy: the tests show Hestia finding it.
    "$PY" -m pip install -q -e strategies/hestia-time-window
    touch "$stamp"
  fi
}

system_deps() {
  # Debian packages the tests drive for real (engines, proxies, browsers, checkers).
  "$ROOT/scripts/install-system-deps.sh"
}

# A process that exists and has not ended (an ended one not yet reaped by its parent is a zombie).
alive() {
  kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]
}

# The pid of the Hestia `run` started from this checkout, if it still runs.
running_pid() {
  local pid
  pid="$(cat "$RUN_DIR/hestia.pid" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && printf '%s' "$pid"
}

run() {
  local pid
  if pid="$(running_pid)"; then
    # twistd would refuse too, but its message suggests a --pidfile that dev.sh owns.
    echo "Hestia is already running from this checkout (pid $pid): ./scripts/dev.sh stop stops it" >&2
    exit 1
  fi
  setup
  mkdir -p "$RUN_DIR"
  local config="${HESTIA_CONFIG:-$ROOT/hestia_config.yml}"
  say "starting Hestia on $config (Ctrl-C to stop)"
  # Hot reload: a saved change of the file is applied like SIGHUP (HESTIA_WATCH_CONFIG=0: off).
  local watch=(--watch-config)
  [ "${HESTIA_WATCH_CONFIG:-1}" = 0 ] && watch=()
  # .venv/bin first: the shipped config's demo service is the `hestia-demo` command.
  PATH="$VENV/bin:$PATH" exec "$VENV/bin/twistd" --nodaemon --pidfile="$RUN_DIR/hestia.pid" hestia --config "$config" "${watch[@]}" "$@"
}

# A test run that hangs (a stuck process, a thread keeping Python alive) must fail, not stall CI:
# the whole pytest run gets HESTIA_TEST_TIMEOUT seconds (default 25 minutes).
pytest_bounded() {
  timeout --signal=TERM --kill-after=30 "${HESTIA_TEST_TIMEOUT:-1500}" "$PY" -m pytest "$@"
}

test_suite() {
  setup
  system_deps
  local suite="${1:-all}"
  shift || true
  mkdir -p "$ROOT/tests/artifacts"
  if [ "$suite" = "all" ] || [ "$suite" = "container" ] || coverage_needs_engine "$suite"; then
    "$ROOT/scripts/podman-engine.sh" install >&2
    "$ROOT/scripts/podman-engine.sh" start >/dev/null
  fi
  local status=0
  case "$suite" in
    all)
      pytest_bounded tests "$@" || status=$?
      lint || status=$?
      ;;
    lint) lint || status=$? ;;
    coverage) coverage_suite "$@" || status=$? ;;
    unit|integration|container|semaphore|browser|contract)
      pytest_bounded tests -m "$suite" "$@" || status=$? ;;
    *) pytest_bounded tests -k "$suite" "$@" || status=$? ;;
  esac
  return $status
}

lint() {
  local status=0
  say "ruff"
  "$VENV/bin/ruff" check src tests strategies bench || status=1
  say "mypy"
  "$VENV/bin/mypy" || status=1
  return $status
}

# ---- issue 20: setup report, status table, coverage suite ---------------- begin ----

# What `dev.sh setup` installed, and what to try next.
setup_report() {
  say "installed in .venv"
  "$PY" - "$ROOT" <<'PYEOF'
import sys
from importlib import metadata

root = sys.argv[1]
print(f"  virtualenv   {root}/.venv (Python {sys.version.split()[0]})")
print(f"  hestia       {metadata.version('hestia')} (editable: {root}/src)")
tools = ["twisted", "klein", "treq", "pytest", "hypothesis", "schemathesis", "coverage", "ruff", "mypy",
         "hestia-time-window"]
found = []
for name in tools:
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} (missing)")
print("  packages     " + ", ".join(found))
PYEOF
  local tool present=() missing=()
  for tool in podman nginx caddy wrk chromium prometheus promtool; do
    if command -v "$tool" >/dev/null 2>&1; then present+=("$tool"); else missing+=("$tool"); fi
  done
  printf '  system tools %s\n' "${present[*]:-none}"
  if [ "${#missing[@]}" -gt 0 ]; then
    printf '  not found    %s (./scripts/install-system-deps.sh installs them; tests needing them skip)\n' \
      "${missing[*]}"
  fi
  say "next"
  cat <<'NEXT'
  ./scripts/dev.sh run           # Hestia on hestia_config.yml; saving the file applies it
  ./scripts/dev.sh status        # in another terminal: the services as a table
  ./scripts/dev.sh test unit     # the fast tests (DEV_ENVIRONMENT.md lists the suites)
NEXT
}

# The running gateway's services, as the CLI's table; a clear line when none answers.
status() {
  local url="${HESTIA_URL:-http://localhost:8080}"
  [ -x "$VENV/bin/hestia" ] || setup
  local rc=0 err
  err="$(mktemp)"
  HESTIA_URL="$url" "$VENV/bin/hestia" status "$@" 2>"$err" || rc=$?
  if [ "$rc" -eq 5 ]; then  # hestia.cli.Exit.UNREACHABLE
    echo "no Hestia gateway is running at $url (start one with ./scripts/dev.sh run, or set HESTIA_URL)" >&2
  else
    cat "$err" >&2
  fi
  rm -f "$err"
  return "$rc"
}

# The container tests are part of the whole suite that `coverage` runs; HESTIA_TEST_ENGINE=0 leaves
# the engine alone (run with -m 'not container' then).
coverage_needs_engine() {
  [ "$1" = "coverage" ] && [ "${HESTIA_TEST_ENGINE:-1}" != 0 ]
}

# The whole suite under coverage.py (branch coverage; every Python process the tests start is
# measured: tests/coverage_site/sitecustomize.py). Terminal summary, HTML report in
# tests/artifacts/coverage/, and a failure below the floor in .coveragerc ([report] fail_under).
coverage_suite() {
  local out="$ROOT/tests/artifacts/coverage" status=0
  rm -rf "$out"
  mkdir -p "$out"
  say "the whole suite under coverage (slow: every process is measured)"
  COVERAGE_PROCESS_START="$ROOT/.coveragerc" COVERAGE_RCFILE="$ROOT/.coveragerc" COVERAGE_FILE="$out/.coverage" \
    PYTHONPATH="$ROOT/tests/coverage_site${PYTHONPATH:+:$PYTHONPATH}" \
    HESTIA_TEST_TIMEOUT="${HESTIA_TEST_TIMEOUT:-3600}" pytest_bounded tests "$@" || status=$?
  local cov=(env COVERAGE_RCFILE="$ROOT/.coveragerc" COVERAGE_FILE="$out/.coverage" "$PY" -m coverage)
  "${cov[@]}" combine --quiet "$out" || { echo "no coverage data was written" >&2; return 1; }
  "${cov[@]}" html --quiet -d "$out" || status=$?
  "${cov[@]}" report || status=$?  # exit 2 below the floor
  say "HTML report: $out/index.html"
  return $status
}

# ---- issue 20: setup report, status table, coverage suite ------------------ end ----

# The Hestia `run` started; with --engine, the test engine too. The engine is machine-wide
# (/run/hestia-podman, shared by every checkout and test run), so only on request.
stop() {
  local pid i
  case "${1:-}" in
    "" | --engine) ;;
    *) echo "usage: ./scripts/dev.sh stop [--engine]" >&2; return 2 ;;
  esac
  if pid="$(running_pid)"; then
    kill -TERM "$pid"
    for ((i = 0; i < 300; i++)); do  # up to 30 s: Hestia drains and stops its services first
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      echo "Hestia (pid $pid) is still stopping after 30 s" >&2
      return 1
    fi
    say "stopped Hestia (pid $pid)"
  else
    rm -f "$RUN_DIR/hestia.pid"  # stale: that process is gone
    say "no Hestia started by ./scripts/dev.sh run is running"
  fi
  if [ "${1:-}" = --engine ]; then "$ROOT/scripts/podman-engine.sh" stop; fi
}

case "${1:-}" in
  setup) setup; setup_report ;;
  run) shift; run "$@" ;;
  test) shift; test_suite "$@" ;;
  status) shift; status "$@" ;;
  stop) shift; stop "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
