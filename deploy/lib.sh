# Shared helpers for deploy/demo.sh and deploy/bench.sh (sourced, not run).
# A private containerd under a temporary directory, with target/release first on its PATH.

repo=${repo:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
TANDEM_BIN_DIR=${TANDEM_BIN_DIR:-$repo/target/release}
BUSYBOX_REF=docker.io/tandem/busybox:latest
CTD_NS=${CTD_NS:-tandem-demo}

# start_containerd: sets CTD_DIR, CTD_SOCK, CTD_PID; containerd's log is $CTD_DIR/containerd.log.
start_containerd() {
    CTD_DIR=$(mktemp -d /tmp/tandem-ctd.XXXXXX)
    CTD_SOCK=$CTD_DIR/c.sock
    cat >"$CTD_DIR/config.toml" <<TOML
version = 2
root = "$CTD_DIR/root"
state = "$CTD_DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTD_SOCK"
[ttrpc]
  address = "$CTD_SOCK.ttrpc"
[debug]
  address = "$CTD_DIR/debug.sock"
  level = "${CTD_LOG_LEVEL:-info}"
TOML
    PATH="$TANDEM_BIN_DIR:$PATH" containerd --config "$CTD_DIR/config.toml" \
        >"$CTD_DIR/containerd.log" 2>&1 </dev/null &
    CTD_PID=$!
    local i
    for i in $(seq 200); do
        if [ -S "$CTD_SOCK" ] && ctr -a "$CTD_SOCK" version >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$CTD_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "containerd did not start; log:" >&2
    cat "$CTD_DIR/containerd.log" >&2
    return 1
}

ctrn() { ctr -a "$CTD_SOCK" -n "$CTD_NS" "$@"; }

import_busybox() {
    local tar=$repo/target/tandem-build/busybox.tar
    "$repo/deploy/images/build-busybox.sh" "$tar" "$BUSYBOX_REF"
    ctrn images import "$tar" >/dev/null
}

# stop_containerd: removes leftover tasks/containers, stops containerd and its shims, unmounts
# and removes the temporary directory and the namespace cgroups.
stop_containerd() {
    [ -n "${CTD_DIR:-}" ] || return 0
    local t p
    for t in $(ctrn task ls -q 2>/dev/null); do
        ctrn task kill -a -s SIGKILL "$t" >/dev/null 2>&1 || true
        ctrn task delete -f "$t" >/dev/null 2>&1 || true
    done
    for t in $(ctrn containers ls -q 2>/dev/null); do
        ctrn containers rm "$t" >/dev/null 2>&1 || true
    done
    if [ -n "${CTD_PID:-}" ] && kill -0 "$CTD_PID" 2>/dev/null; then
        kill -TERM "$CTD_PID"
        for _ in $(seq 100); do kill -0 "$CTD_PID" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$CTD_PID" 2>/dev/null || true
        wait "$CTD_PID" 2>/dev/null || true
    fi
    for p in $(pgrep -f -- "-address $CTD_SOCK" || true); do kill -KILL "$p" 2>/dev/null || true; done
    awk -v d="$CTD_DIR" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$CTD_DIR"
    for p in /sys/fs/cgroup/*/"$CTD_NS" /sys/fs/cgroup/"$CTD_NS"; do
        [ -d "$p" ] && rmdir "$p" 2>/dev/null || true
    done
    CTD_DIR=
}
