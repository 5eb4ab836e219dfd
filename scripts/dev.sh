#!/usr/bin/env bash
# Hestia's developer entry point: the README's two commands and a few helpers.
#
#   ./scripts/dev.sh setup        virtualenv + Hestia installed in it (editable)
#   ./scripts/dev.sh run          setup, then run Hestia on hestia_config.yml (foreground)
#   ./scripts/dev.sh test [SUITE] every test, lint and type check (SUITE: unit, integration, browser,
#                                 container, semaphore, lint, or a pytest -k expression)
#   ./scripts/dev.sh status       what the running Hestia says about its services
#   ./scripts/dev.sh stop         stop a Hestia started by `run` and the test engines
#
# Environment: HESTIA_CONFIG (default ./hestia_config.yml), HESTIA_LISTEN, HESTIA_RUN_DIR (the pidfile's
# directory, default ./.run), PYTHON (default python3),
# HESTIA_URL for `status` (default http://localhost:8080).
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

run() {
  setup
  mkdir -p "$RUN_DIR"
  local config="${HESTIA_CONFIG:-$ROOT/hestia_config.yml}"
  say "starting Hestia on $config (Ctrl-C to stop)"
  # .venv/bin first: the shipped config's demo service is the `hestia-demo` command.
  PATH="$VENV/bin:$PATH" exec "$VENV/bin/twistd" --nodaemon --pidfile="$RUN_DIR/hestia.pid" hestia --config "$config" "$@"
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
  if [ "$suite" = "all" ] || [ "$suite" = "container" ]; then
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
    unit|integration|container|semaphore|browser)
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

status() {
  local url="${HESTIA_URL:-http://localhost:8080}"
  curl -fsS "$url/v1/services" | "${PYTHON:-python3}" -m json.tool
}

stop() {
  if [ -f "$RUN_DIR/hestia.pid" ]; then
    kill "$(cat "$RUN_DIR/hestia.pid")" 2>/dev/null && say "stopped Hestia" || true
  fi
  [ -x "$ROOT/scripts/podman-engine.sh" ] && "$ROOT/scripts/podman-engine.sh" stop || true
}

case "${1:-}" in
  setup) setup; say "ready: ./scripts/dev.sh run, then curl http://localhost:8080/v1/services/ollama/status" ;;
  run) shift; run "$@" ;;
  test) shift; test_suite "$@" ;;
  status) status ;;
  stop) stop ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
