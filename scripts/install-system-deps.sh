#!/usr/bin/env bash
# Debian packages the test suite and the benchmark drive for real. Idempotent: installs only
# what is missing, and runs `apt-get update` only when something is.
set -euo pipefail
packages=(podman runc busybox-static nginx caddy wrk prometheus chromium chromium-driver sqlite3 curl systemd)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update -q >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >&2
