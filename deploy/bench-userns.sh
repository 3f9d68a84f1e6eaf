#!/usr/bin/env bash
# Benchmark (not a test): pod start with and without a user namespace, same run, same
# containerd: median wall time of `ctr run --rm busybox /bin/true` with tandem's
# `[userns] mode = "off"` and `mode = "pod"` (range allocation, idmapped overlay rootfs, new
# user namespace), runs interleaved, N each (default 20); prints both medians and the ratio
# (target <= 1.1).
# Usage (root): deploy/bench-userns.sh [N]   Needs deploy/setup.sh done and the release shim built.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-20}
CTD_NS=tandem-bench-userns
# shellcheck source=deploy/lib.sh
. "$repo/deploy/lib.sh"

trap stop_containerd EXIT
start_containerd
# the pod's root (an unprivileged host ID) must reach the bundle's rootfs: containerd's own
# state dir is searchable (0711), mktemp's directory is not
chmod 711 "$CTD_DIR"
import_busybox

cat >"$CTD_DIR/off.toml" <<TOML
[userns]
mode = "off"
TOML
cat >"$CTD_DIR/pod.toml" <<TOML
[userns]
mode = "pod"
pool_start = 2000000000
pool_size = 1048576
TOML

now_ns() { date +%s%N; }
declare -A times
run_one() { # <mode> <i>
    local t0 t1
    t0=$(now_ns)
    ctrn run --rm --runtime io.containerd.tandem.v2 --runtime-config-path "$CTD_DIR/$1.toml" \
        "$BUSYBOX_REF" "bench-$1-$2" /bin/true >/dev/null
    t1=$(now_ns)
    times[$1]+="$(( (t1 - t0) / 1000 )) "
}
median_ms() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.1f", m / 1000}'; }

# one warm-up each, not counted
run_one off w; run_one pod w; times=()
for i in $(seq "$n"); do
    if (( i % 2 )); then run_one off "$i"; run_one pod "$i"; else run_one pod "$i"; run_one off "$i"; fi
done
off=$(echo "${times[off]}" | median_ms)
pod=$(echo "${times[pod]}" | median_ms)
echo "pod start (ctr run --rm busybox /bin/true), median of $n, tandem container mode:"
printf '  userns off   %8s ms\n' "$off"
printf '  userns pod   %8s ms\n' "$pod"
awk -v a="$pod" -v b="$off" 'BEGIN {printf "  ratio pod/off  %.2fx (target <= 1.10x)\n", a / b}'
