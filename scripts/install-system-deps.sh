#!/usr/bin/env bash
# Debian packages the test suite and the benchmark drive for real.
#
# Installs only what is missing, says what and why, and never upgrades a package that
# is already installed: apt-get runs with --no-upgrade, and its plan is simulated first
# (apt-get -s); if installing the missing packages would upgrade or remove anything the
# machine already has, nothing is installed and the script says which packages (set
# HESTIA_APT_ALLOW_UPGRADES=1 to accept that plan). Recommends are not installed: the
# ones the tests need are listed by name below. `apt-get update` runs only when
# something is missing.
set -euo pipefail

# package|why (what uses it)
wanted=(
  "podman|the container engine: tests/test_docker_*.py, tests/test_container_image.py (scripts/podman-engine.sh)"
  "runc|the OCI runtime podman-engine.sh pins"
  "netavark|rootful Podman networking and port publishing"
  "aardvark-dns|container names in DNS on compose networks (Hestia reaches http://ollama:11434)"
  "iptables|netavark's port forwarding rules"
  "catatonit|the init of --init / HostConfig.Init, so containers stop on SIGTERM"
  "busybox-static|the test images' only binary (no registry is reachable)"
  "docker-compose|runs docker-compose.yml against Podman's Docker API (tests/test_container_image.py)"
  "mmdebstrap|builds the Dockerfile's base image from Debian packages (podman-engine.sh base-image)"
  "git|tests/support/wheelhouse.py builds the wheel from the checkout's files"
  "nginx|a real reverse proxy in front of Hestia (proxy tests)"
  "caddy|a second real reverse proxy (proxy tests)"
  "wrk|load generator (bench/)"
  "prometheus|promtool checks the /v1/metrics exposition"
  "chromium|headless browser tests (tests/test_ui_browser.py)"
  "chromium-driver|Selenium's driver for chromium"
  "fonts-liberation|fonts for the headless browser (a recommends of chromium)"
  "sqlite3|inspecting state databases in tests"
  "curl|health probes in scripts and tests"
  "systemd|systemd-analyze verifies contrib/systemd/hestia.service (tests/test_docs.py)"
)

installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

missing=()
reasons=()
for entry in "${wanted[@]}"; do
  package="${entry%%|*}"
  installed "$package" || { missing+=("$package"); reasons+=("  $package: ${entry#*|}"); }
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-system-deps: missing Debian packages, to be installed (without their recommends):" >&2
printf '%s\n' "${reasons[@]}" >&2
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
apt_install=(apt-get install -y -q --no-install-recommends --no-upgrade)
$SUDO apt-get update -q >&2

# What apt would do. "Inst pkg [old] (new ...)" is an upgrade of an installed package;
# "Remv pkg" a removal: the user's packages are left as they are.
plan="$($SUDO "${apt_install[@]}" -s "${missing[@]}")"
changed="$(printf '%s\n' "$plan" | awk '/^Inst [^ ]+ \[/ {print "  upgrade " $2 " from " $3} /^Remv / {print "  remove " $2}' | tr -d '[]')"
if [ -n "$changed" ] && [ "${HESTIA_APT_ALLOW_UPGRADES:-}" != 1 ]; then
  echo "install-system-deps: installing ${missing[*]} would change packages this machine already has:" >&2
  printf '%s\n' "$changed" >&2
  echo "install-system-deps: nothing installed. Install them yourself, or rerun with HESTIA_APT_ALLOW_UPGRADES=1." >&2
  exit 1
fi
extra="$(printf '%s\n' "$plan" | awk '/^Inst [^ ]+ \(/ {print $2}' | grep -vxF -f <(printf '%s\n' "${missing[@]}") | tr '\n' ' ' || true)"
[ -n "$extra" ] && echo "install-system-deps: and their dependencies: $extra" >&2
$SUDO "${apt_install[@]}" "${missing[@]}" >&2
