#!/usr/bin/env bash
# Benchmark (not a test): on one private containerd, for tandem, runc (runc shim) and crun
# (runc shim with --runc-binary crun):
#   - median wall time of `ctr run --rm busybox /bin/true` over N runs (default 20)
#   - RSS of the shim process(es) while a container sleeps
# Usage (root): deploy/bench.sh [N]      Needs deploy/setup.sh done and the release shim built.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-20}
CTD_NS=tandem-bench
# shellcheck source=deploy/lib.sh
. "$repo/deploy/lib.sh"
trap stop_containerd EXIT
start_containerd
import_busybox

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# bench NAME RUNTIME [extra ctr run flags...]: prints "NAME median_ms rss_kib" or "NAME - -".
bench() {
    local name=$1 rt=$2; shift 2
    local times=() i t0 t1 id
    # Warm-up run (page cache, first shim exec); also tells whether the runtime works.
    if ! ctrn run --rm --runtime "$rt" "$@" "$BUSYBOX_REF" "bench-$name-warm" /bin/true >/dev/null 2>"$CTD_DIR/err"; then
        echo "$name: does not run: $(tail -1 "$CTD_DIR/err")" >&2
        echo "$name - -"
        return
    fi
    for i in $(seq "$n"); do
        id=bench-$name-$i
        t0=$(now_ms)
        ctrn run --rm --runtime "$rt" "$@" "$BUSYBOX_REF" "$id" /bin/true >/dev/null
        t1=$(now_ms)
        times+=($((t1 - t0)))
    done
    local median
    median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}')

    # RSS of every shim process serving this container (a shim may fork a daemon).
    id=bench-$name-sleep
    ctrn run -d --runtime "$rt" "$@" "$BUSYBOX_REF" "$id" sleep 1000 >/dev/null
    sleep 1
    local rss=0 p
    for p in $(pgrep -f -- "containerd-shim.*-id $id( |$)" || true); do
        rss=$((rss + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    ctrn task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    ctrn task delete -f "$id" >/dev/null 2>&1 || true
    ctrn containers rm "$id" >/dev/null 2>&1 || true
    echo "$name $median $rss"
}

results=()
# crun 1.8 refuses every container on a hybrid hierarchy whose cgroup2 mount has a controller
# enabled ("cgroups in hybrid mode not supported"); tandem enables hugetlb there for hugepage
# limits. Measure crun first, with hugetlb disabled at the cgroup2 root while nothing uses it,
# and put it back afterwards.
unified=/sys/fs/cgroup/unified/cgroup.subtree_control
restore_hugetlb=
if [ -f "$unified" ] && grep -qw hugetlb "$unified"; then
    if echo -hugetlb >"$unified" 2>/dev/null; then
        restore_hugetlb=1
    else
        echo "crun: hugetlb is in use under /sys/fs/cgroup/unified; crun will refuse to run" >&2
    fi
fi
crun_result=$(bench crun io.containerd.runc.v2 --runc-binary crun)
[ -n "$restore_hugetlb" ] && echo +hugetlb >"$unified"

if [ -x "$TANDEM_BIN_DIR/containerd-shim-tandem-v2" ]; then
    results+=("$(bench tandem io.containerd.tandem.v2)")
else
    echo "tandem: $TANDEM_BIN_DIR/containerd-shim-tandem-v2 not built" >&2
    results+=("tandem - -")
fi
results+=("$(bench runc io.containerd.runc.v2)")
results+=("$crun_result")

echo
echo "containerd $(containerd --version | awk '{print $3}'), $(uname -r), $(nproc) cpus, N=$n"
printf '%-8s %14s %10s %14s %10s\n' runtime "run --rm (ms)" "vs runc" "shim RSS (KiB)" "vs runc"
runc_ms=$(printf '%s\n' "${results[@]}" | awk '$1=="runc" {print $2}')
runc_rss=$(printf '%s\n' "${results[@]}" | awk '$1=="runc" {print $3}')
for r in "${results[@]}"; do
    read -r name ms rss <<<"$r"
    ratio() { if [ "$1" = - ] || [ -z "$2" ] || [ "$2" = - ] || [ "$2" = 0 ]; then echo -; else awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", a/b}'; fi; }
    printf '%-8s %14s %10s %14s %10s\n' "$name" "$ms" "$(ratio "$ms" "$runc_ms")" "$rss" "$(ratio "$rss" "$runc_rss")"
done
