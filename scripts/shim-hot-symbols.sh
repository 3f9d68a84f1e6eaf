#!/usr/bin/env bash
# Regenerates scripts/shim-hot-symbols.txt, the symbol ordering list of scripts/link-shim.sh: the
# functions a container-mode shim runs, server first, in the order it first runs them, then those
# only the other processes of the binary run (`start`, the container init, `delete`).
# Usage (root, needs tracefs with uprobe events, deploy/setup.sh done):
#   scripts/shim-hot-symbols.sh [BINDIR]     (default: <repo>/target/release, a release build)
# How: a uprobe on the entry of every function of the binary (nm), a private containerd
# (deploy/lib.sh) and one container lifecycle: run -d, ps, ls, exec (twice), metrics,
# pause/resume, kill, delete, then one run --rm. Every probe hit is recorded with its process
# (record-tgid); the server is the process of the `-id <container>` shim. Rebuild the shim after
# (touch shim/src/main.rs; cargo build --release -p tandem-shim). A stale list costs memory only.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export TANDEM_BIN_DIR=${1:-$repo/target/release}
bin=$TANDEM_BIN_DIR/containerd-shim-tandem-v2
out=$repo/scripts/shim-hot-symbols.txt
T=/sys/kernel/tracing
I=$T/instances/tandem-hot
work=$(mktemp -d /tmp/tandem-hot.XXXXXX)
CTD_NS=tandem-hot
# shellcheck source=deploy/lib.sh
. "$repo/deploy/lib.sh"

cleanup() {
    echo 0 >"$I/tracing_on" 2>/dev/null || true
    echo 0 >"$I/events/tandemhot/enable" 2>/dev/null || true
    rmdir "$I" 2>/dev/null || true
    local n
    for n in $(awk '/^p:tandemhot\//{split($1, a, ":"); print a[2]}' "$T/uprobe_events"); do
        echo "-:$n" >>"$T/uprobe_events" || true
    done
    stop_containerd
    rm -rf "$work"
}
trap cleanup EXIT

# One probe per function address (file offset = address - text segment's vaddr-offset delta);
# one write per probe (a long write is cut mid-line by tracefs).
delta=$(readelf -lW "$bin" | awk '$1 == "LOAD" && $7 ~ /E/ {print $3, $2}' |
    while read -r v o; do echo $((v - o)); done)
nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $1}' | sort -u |
    while read -r a; do
        printf 'p:tandemhot/p%s %s:0x%x\n' "$a" "$bin" $((0x$a - delta)) >>"$T/uprobe_events" 2>/dev/null || true
    done
mkdir -p "$I"
echo 200000 >"$I/buffer_size_kb"
echo 1 >"$I/options/record-tgid"
echo 1 >"$I/events/tandemhot/enable"
start_containerd
import_busybox
rt=io.containerd.tandem.v2
echo 1 >"$I/tracing_on"
ctrn run -d --runtime $rt "$BUSYBOX_REF" hot sleep 1000 >/dev/null
sleep 1
server=$(pgrep -f -- "containerd-shim.*-id hot( |$)" | head -1)
ctrn task ps hot >/dev/null
ctrn task ls >/dev/null
ctrn task exec --exec-id e1 hot /bin/true
ctrn task exec --exec-id e2 hot /bin/sh -c 'echo hi; exit 3' >/dev/null || true
ctrn task metrics hot >/dev/null || true
ctrn task pause hot 2>/dev/null && ctrn task resume hot 2>/dev/null || true
ctrn task kill -s SIGTERM hot
sleep 0.5
ctrn task delete hot >/dev/null 2>&1 || ctrn task delete -f hot >/dev/null 2>&1 || true
ctrn containers rm hot >/dev/null 2>&1 || true
ctrn run --rm --runtime $rt "$BUSYBOX_REF" hot2 /bin/true >/dev/null
sleep 1
echo 0 >"$I/tracing_on"
if grep -q '^overrun: [1-9]' "$I"/per_cpu/cpu*/stats; then
    echo "shim-hot-symbols.sh: trace buffer overran; list would be incomplete" >&2
    exit 1
fi
cat "$I/trace" >"$work/trace"
nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $1, $3}' >"$work/names"
# "<comm>-<tid> (<tgid>) [cpu] flags ts: p<addr>: (...)": first hits, server's first
awk -v server="$server" -v names="$work/names" '
    BEGIN { while ((getline l < names) > 0) { split(l, f, " "); nm[f[1]] = nm[f[1]] " " f[2] } }
    /^#/ { next }
    {
        if (!match($0, /\( *[0-9]+\)/)) next
        tgid = substr($0, RSTART + 1, RLENGTH - 2) + 0
        if (!match($0, /: p[0-9a-f]+:/)) next
        a = substr($0, RSTART + 3, RLENGTH - 4)
        if (tgid == server) { if (!(a in s)) { s[a] = 1; so[++ns] = a } }
        else if (!(a in o)) { o[a] = 1; oo[++no] = a }
    }
    END {
        for (i = 1; i <= ns; i++) out(so[i])
        for (i = 1; i <= no; i++) if (!(oo[i] in s)) out(oo[i])
    }
    function out(a,   n, f, i) { n = split(nm[sprintf("%016s", a)], f, " "); for (i = 1; i <= n; i++) print f[i] }
' "$work/trace" >"$out.new"
mv "$out.new" "$out"
echo "shim-hot-symbols.sh: $(wc -l <"$out") symbols in $out (server pid $server)"
