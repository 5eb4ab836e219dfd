#!/usr/bin/env bash
# Run a real, rootful Podman engine that serves the Docker Engine HTTP API on a
# unix socket, for Hestia's `docker` backend tests (CI and developers alike).
#
#   scripts/podman-engine.sh install   apt-get the engine and its helpers (idempotent)
#   scripts/podman-engine.sh start     start the API service + build the test image;
#                                      prints the socket path on stdout (last line)
#   scripts/podman-engine.sh stop      stop the API service started by `start`
#   scripts/podman-engine.sh status    say whether it runs and answers; exit 0 if so
#   scripts/podman-engine.sh image     (re)build the test image if absent
#   scripts/podman-engine.sh podman ARGS...
#                                      run podman with the engine's store, runtime and
#                                      containers.conf (what the container tests use)
#   scripts/podman-engine.sh base-image
#                                      build the Dockerfile's base image from Debian
#                                      packages if absent (for the container suite)
#
# Environment:
#   HESTIA_PODMAN_SOCK            socket path (default /run/hestia-podman/podman.sock);
#                                 the pidfile, log and generated containers.conf live
#                                 in the same directory.
#   HESTIA_PODMAN_STORAGE_DRIVER  optional --storage-driver (overlay works here; vfs is a
#                                 fallback for filesystems without overlay support. Do not
#                                 switch drivers on an existing /var/lib/containers: podman
#                                 refuses a store created by another driver.)
#   HESTIA_PODMAN_NOFILE / HESTIA_PODMAN_NPROC
#                                 default per-container ulimits (see `write_conf`).
#
# Clients: DOCKER_HOST=unix://<socket>, and the tests read HESTIA_PODMAN_SOCK. The API is
# Docker-compatible at /v1.41 and unversioned paths (Podman 4.3: ApiVersion 1.41,
# MinAPIVersion 1.24). The Docker CLI works for ps/images/logs/start/stop/`run -d`, but
# an attached `docker run` (CLI 28) fails with "unable to upgrade to tcp, received 409".
#
# What a container needs here (found by trial on this sandbox; see write_conf):
#   podman run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --init \
#       -p 127.0.0.1:HOSTPORT:8080 localhost/hestia-busybox:latest httpd -f -p 8080 -h /www
# or through the API, POST /v1.41/containers/create with
#   "HostConfig": {"Init": true,
#                  "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 1024},
#                              {"Name": "nproc", "Soft": 1024, "Hard": 1024}],
#                  "PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "HOSTPORT"}]}}
#   plus "ExposedPorts": {"8080/tcp": {}}. Rootful bridge networking (netavark, subnet
#   10.88.0.0/16, host-local only) publishes the port; netavark also sets
#   net.ipv4.ip_forward=1 on the host. --network host (HostConfig.NetworkMode "host")
#   works as well, with httpd listening on 127.0.0.1:HOSTPORT itself.
# Known podman 4.3 quirk: if a container fails to start, the service keeps holding its
# published host port until that container is removed ("address already in use").
set -euo pipefail

SOCK="${HESTIA_PODMAN_SOCK:-/run/hestia-podman/podman.sock}"
STATE_DIR="$(dirname "$SOCK")"
PIDFILE="$STATE_DIR/podman.pid"
LOGFILE="$STATE_DIR/podman-service.log"
CONF="$STATE_DIR/containers.conf"
IMAGE="localhost/hestia-busybox:latest"
# The Dockerfile's FROM. No image registry is reachable here, so `base-image` makes one
# with the same name from Debian packages (mmdebstrap), labelled so it can be told apart.
BASE_IMAGE="${HESTIA_BASE_IMAGE:-docker.io/library/python:3.11-slim}"
BASE_LABEL="org.opencontainers.image.title=hestia-test-base"

# Packages (Debian bookworm names):
#   podman          the engine; `podman system service` is the Docker-compatible API.
#   runc            OCI runtime. Debian's podman prefers crun when present; we pin runc
#                   (known to work in this sandbox) with --runtime below.
#   busybox-static  a static /bin/busybox: the whole root filesystem of the test image,
#                   since no container registry is reachable from here.
#   catatonit       the init that HostConfig.Init=true / `podman run --init` injects, so
#                   SIGTERM reaches `httpd` (as PID 1 it would ignore SIGTERM and every
#                   stop would wait out its timeout before SIGKILL).
#   netavark, iptables
#                   rootful bridge networking + port publishing (-p 127.0.0.1:H:C /
#                   HostConfig.PortBindings): netavark writes the DNAT rules with
#                   iptables (nf_tables backend here). slirp4netns/pasta are only needed
#                   for *rootless* podman, which this script does not use.
#   curl            the readiness probe (`curl --unix-socket $SOCK http://d/_ping`).
#   aardvark-dns    container names in DNS on user networks (compose's default network).
PACKAGES=(podman runc busybox-static catatonit netavark aardvark-dns iptables curl)

# Global podman options, shared by the service and by the image build so that both
# see the same store and runtime:
#   --runtime runc             see above (crun is not installed; be explicit anyway).
#   --cgroup-manager=cgroupfs  there is no systemd as PID 1 here (no /run/systemd/system),
#                              so the default "systemd" manager cannot create scopes;
#                              cgroupfs writes the v1 hierarchy directly.
#   --events-backend=file      the default is journald, and no journald runs here; the
#                              /events API endpoint (used by Hestia to watch containers)
#                              needs a working event log.
podman_global=(--runtime runc --cgroup-manager=cgroupfs --events-backend=file)
if [[ -n "${HESTIA_PODMAN_STORAGE_DRIVER:-}" ]]; then
    podman_global+=(--storage-driver "$HESTIA_PODMAN_STORAGE_DRIVER")
fi

log() { printf 'podman-engine: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    # Rootful on purpose: this sandbox runs everything as root, and rootful podman
    # publishes ports with netavark (no slirp4netns/pasta, no subuid setup).
    [[ "$(id -u)" == 0 ]] || die "must run as root (this script manages the rootful podman engine)"
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

cmd_install() {
    need_root
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "all packages present: ${PACKAGES[*]}"
        return 0
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Never upgrade what is installed (scripts/install-system-deps.sh explains and checks).
    apt-get install -y -q --no-install-recommends --no-upgrade "${missing[@]}"
}

# The limits the engine may hand to containers. In this sandbox even root lacks
# CAP_SYS_RESOURCE, so a container's rlimits cannot exceed the hard limits of the
# service process. Podman's rootful defaults (nofile=nproc=1048576) are above them,
# and every container then fails to start with
#   "error setting rlimit type 7 (NOFILE) / 6 (NPROC): operation not permitted".
# Hence: explicit `--ulimit nofile=N:N --ulimit nproc=N:N` for `podman run`, and
# HostConfig.Ulimits for API clients; and, so that clients which pass no Ulimits
# (e.g. `docker run` through this socket) still work, default_ulimits in the
# containers.conf the service is started with.
# Note that podman lowers its *own* RLIMIT_NPROC at startup (to 32768 here, the
# kernel's pid_max, although the shell's hard limit is 96364), so the values are
# checked against the running service and fixed up by `cmd_start` if too high.
cap_limit() { # $1: a limit ("unlimited" or a number); prints min($1, 65536)
    local h=$1
    if [[ "$h" == unlimited ]] || ((h > 65536)); then h=65536; fi
    printf '%s' "$h"
}

proc_hard_limit() { # $1: pid, $2: row name in /proc/PID/limits; prints its hard limit
    awk -v n="$2" 'index($0, n) == 1 { sub(n, ""); print $2 }' "/proc/$1/limits"
}

write_conf() { # $1: nofile, $2: nproc (defaults: derived from this shell's limits)
    local nofile="${1:-}" nproc="${2:-}" pid_max
    if [[ -z "$nofile" ]]; then
        nofile="${HESTIA_PODMAN_NOFILE:-$(cap_limit "$(ulimit -Hn)")}"
    fi
    if [[ -z "$nproc" ]]; then
        nproc="${HESTIA_PODMAN_NPROC:-$(cap_limit "$(ulimit -Hu)")}"
        pid_max="$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "$nproc")"
        if ((pid_max < nproc)); then nproc=$pid_max; fi
    fi
    # CONTAINERS_CONF replaces (not extends) the config search, so start from Debian's
    # shipped defaults and add default_ulimits under its [containers] table.
    local base=/usr/share/containers/containers.conf
    local line="default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    if [[ -f "$base" ]] && grep -q '^\[containers\]' "$base"; then
        sed "0,/^\[containers\]/s//[containers]\n$line/" "$base" >"$CONF.tmp"
    else
        printf '[containers]\n%s\n' "$line" >"$CONF.tmp"
    fi
    mv "$CONF.tmp" "$CONF"
    CONF_NOFILE=$nofile
    CONF_NPROC=$nproc
}

service_pid() { # prints the pid of our running service, or fails
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against pid reuse: it must still be a podman process.
    grep -q podman "/proc/$pid/cmdline" 2>/dev/null || return 1
    printf '%s' "$pid"
}

ping_ok() {
    [[ -S "$SOCK" ]] && [[ "$(curl -sS -m 5 --unix-socket "$SOCK" http://d/_ping 2>/dev/null)" == OK ]]
}

run_podman() {
    CONTAINERS_CONF="$CONF" podman "${podman_global[@]}" "$@"
}

build_rootfs() { # $1: empty dir; fills it with a busybox-only root filesystem
    local root=$1 applet
    mkdir -p "$root"/{bin,etc,tmp,www,root}
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox" || return 1
    for applet in sh ash httpd sleep echo cat ls ps kill env printf true false \
        wget nc id hostname mkdir rm date head tail grep sed uname ip; do
        ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    printf 'hestia-busybox ok\n' >"$root/www/index.html"
}

cmd_image() {
    need_root
    [[ -f "$CONF" ]] || write_conf
    if run_podman image exists "$IMAGE"; then
        log "image $IMAGE present"
        return 0
    fi
    [[ -x /bin/busybox ]] || die "/bin/busybox missing: run '$0 install' (busybox-static)"
    log "building $IMAGE from busybox-static"
    local root
    root="$(mktemp -d)"
    if ! build_rootfs "$root" || ! tar -C "$root" -c . | run_podman import --quiet \
        --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/bin' \
        --change 'LABEL org.opencontainers.image.title=hestia-busybox' \
        - "$IMAGE" >/dev/null; then
        rm -rf "$root"
        die "could not build $IMAGE"
    fi
    rm -rf "$root"
    log "built $IMAGE"
}

cmd_base_image() {
    # A stand-in for python:3.11-slim: Debian bookworm's python3 (3.11) with venv, built by
    # mmdebstrap (about 30 s with a warm apt cache) and imported as a one-layer image. Built
    # once and kept: the container suite reuses it across runs (never pruned by us).
    need_root
    [[ -f "$CONF" ]] || write_conf
    if run_podman image exists "$BASE_IMAGE"; then
        local title
        title="$(run_podman image inspect --format '{{index .Labels "org.opencontainers.image.title"}}' "$BASE_IMAGE" 2>/dev/null || true)"
        log "base image $BASE_IMAGE present${title:+ ($title)}"
        return 0
    fi
    command -v mmdebstrap >/dev/null || die "mmdebstrap missing: run scripts/install-system-deps.sh"
    log "building $BASE_IMAGE with mmdebstrap --variant=minbase (python3, python3-venv)"
    local tarball
    tarball="$(mktemp --suffix=.tar)"
    # The host's own apt sources (mmdebstrap reads them when given none): the same mirror
    # and snapshot as the machine, nothing else reached.
    if ! mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$tarball" >&2; then
        rm -f "$tarball"
        die "mmdebstrap failed"
    fi
    if ! run_podman import --quiet \
        --change 'CMD ["python3"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change "LABEL $BASE_LABEL" \
        "$tarball" "$BASE_IMAGE" >/dev/null; then
        rm -f "$tarball"
        die "podman import of the base image failed"
    fi
    rm -f "$tarball"
    log "built $BASE_IMAGE"
}

launch_service() { # starts `podman system service` and waits until it answers
    # --time=0: never exit when idle (the default is 5 s of inactivity).
    # setsid: detach from this shell's session so that the engine outlives it.
    CONTAINERS_CONF="$CONF" setsid podman "${podman_global[@]}" \
        system service --time=0 "unix://$SOCK" \
        </dev/null >>"$LOGFILE" 2>&1 &
    local pid=$! i
    echo "$pid" >"$PIDFILE"
    for ((i = 0; i < 300; i++)); do # up to 30 s
        if ping_ok; then
            # Like Debian's podman.socket (SocketMode=0660, group root) and Docker's socket
            # (0660, group docker): a client in the socket's group may use it, as the Hestia
            # container of docker-compose.yml does (group_add: DOCKER_GID).
            chmod 0660 "$SOCK"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$LOGFILE" >&2 || true
            die "podman system service exited; log: $LOGFILE"
        fi
        sleep 0.1
    done
    tail -n 20 "$LOGFILE" >&2 || true
    die "no answer on $SOCK after 30 s; log: $LOGFILE"
}

cmd_start() {
    need_root
    command -v podman >/dev/null || die "podman not installed: run '$0 install'"
    mkdir -p "$STATE_DIR"
    local pid
    if pid="$(service_pid)" && ping_ok; then
        log "already running (pid $pid)"
    else
        if [[ -n "${pid:-}" ]]; then
            log "pid $pid does not answer on $SOCK; restarting it"
            cmd_stop
        fi
        # A socket file left by a killed service makes the new one fail to bind.
        rm -f "$SOCK" "$PIDFILE"
        write_conf
        launch_service
        # Containers may not get rlimits above the service's own hard limits.
        local max_nofile max_nproc
        max_nofile="$(proc_hard_limit "$(cat "$PIDFILE")" "Max open files")"
        max_nproc="$(proc_hard_limit "$(cat "$PIDFILE")" "Max processes")"
        if [[ "$max_nofile" =~ ^[0-9]+$ && "$max_nproc" =~ ^[0-9]+$ ]] &&
            ((CONF_NOFILE > max_nofile || CONF_NPROC > max_nproc)); then
            log "service limits are nofile=$max_nofile nproc=$max_nproc; lowering default_ulimits and restarting"
            cmd_stop
            write_conf "$((CONF_NOFILE < max_nofile ? CONF_NOFILE : max_nofile))" \
                "$((CONF_NPROC < max_nproc ? CONF_NPROC : max_nproc))"
            launch_service
        fi
        log "started (pid $(cat "$PIDFILE")), default_ulimits nofile=$CONF_NOFILE nproc=$CONF_NPROC, log: $LOGFILE"
    fi
    cmd_image
    log "DOCKER_HOST=unix://$SOCK  HESTIA_PODMAN_SOCK=$SOCK"
    printf '%s\n' "$SOCK"
}

cmd_stop() {
    local pid i
    if pid="$(service_pid)"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do # up to 10 s
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        log "stopped (pid $pid)"
    else
        log "not running"
    fi
    # Containers keep running under their conmon monitors; only the API goes away.
    rm -f "$PIDFILE" "$SOCK"
}

cmd_status() {
    local pid
    if pid="$(service_pid)"; then
        if ping_ok; then
            log "running (pid $pid), answering on $SOCK"
            printf '%s\n' "$SOCK"
            return 0
        fi
        log "pid $pid runs but does not answer on $SOCK"
        return 1
    fi
    log "not running (socket $SOCK)"
    return 3
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
image) cmd_image ;;
base-image) cmd_base_image ;;
podman)
    shift
    [[ -f "$CONF" ]] || write_conf
    run_podman "$@"
    ;;
*)
    echo "usage: $0 {install|start|stop|status|image|base-image|podman ARGS...}" >&2
    exit 2
    ;;
esac
