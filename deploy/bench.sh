#!/usr/bin/env bash
# Benchmark (not a test): on one private containerd, for tandem, runc (runc shim) and crun
# (runc shim with --runc-binary crun, i.e. the runc options' BinaryName = crun):
#   - median wall time of `ctr run --rm busybox /bin/true` over N runs (default 20)
#   - memory of the shim process(es) while a container sleeps: VmRSS (the figure compared),
#     and RssAnon and Pss beside it (VmRSS counts the mapped text of the binary and its
#     libraries, which the page cache shares between processes)
# Usage (root): deploy/bench.sh [N]      Needs deploy/setup.sh done and the release shim built.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-20}
CTD_NS=tandem-bench
# shellcheck source=deploy/lib.sh
. "$repo/deploy/lib.sh"

# crun 1.8 refuses every container on a hybrid hierarchy whose cgroup2 mount offers any
# controller ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2": it
# reads /sys/fs/cgroup/unified/cgroup.controllers). This host has `hugetlb` there (no v1
# hierarchy takes it) and enabled at the root (and wherever tandem's engine enabled it, e.g.
# /tandem). For the crun runs, hugetlb is turned off in every cgroup2 directory that enables it
# (deepest first; this works while no cgroup uses hugetlb) and a v1 hierarchy is mounted for it
# at /sys/fs/cgroup/hugetlb, which takes it off cgroup2. restore_host (also at exit, whatever
# happened) unmounts that hierarchy and turns hugetlb back on where it was (shallowest first).
unified=/sys/fs/cgroup/unified
hugetlb_v1=/sys/fs/cgroup/hugetlb
hugetlb_off_in=()
hugetlb_mounted=
hugetlb_off() {
    local f
    while read -r f; do
        echo -hugetlb >"$f" 2>/dev/null || return 1
        hugetlb_off_in+=("$f")
    done < <(find "$unified" -name cgroup.subtree_control -exec grep -lw hugetlb {} + 2>/dev/null |
        awk -F/ '{print NF "\t" $0}' | sort -rn | cut -f2-)
    if grep -qw hugetlb "$unified/cgroup.controllers" && [ ! -e "$hugetlb_v1" ]; then
        mkdir "$hugetlb_v1" || return 1
        hugetlb_mounted=1
        mount -t cgroup -o hugetlb cgroup "$hugetlb_v1" || return 1
    fi
    [ ! -s "$unified/cgroup.controllers" ]
}
restore_host() {
    local i
    if [ -n "$hugetlb_mounted" ]; then
        # The controller goes back to cgroup2 when the v1 hierarchy is destroyed, which the
        # unmount does only if the hierarchy has no child cgroup left, dying ones included;
        # otherwise it lives on unmounted: mount it again, empty it, retry.
        local try j
        for try in 1 2 3 4 5; do
            if mountpoint -q "$hugetlb_v1"; then
                find "$hugetlb_v1" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null || true
                sleep 0.2
                umount "$hugetlb_v1" || true
            fi
            # the destruction is asynchronous
            for j in $(seq 30); do
                grep -qw hugetlb "$unified/cgroup.controllers" && break 2
                sleep 0.1
            done
            mount -t cgroup -o hugetlb cgroup "$hugetlb_v1" 2>/dev/null || true
        done
        rmdir "$hugetlb_v1" 2>/dev/null || true
        grep -qw hugetlb "$unified/cgroup.controllers" ||
            echo "hugetlb is still bound to a v1 hierarchy (see /proc/cgroups)" >&2
        hugetlb_mounted=
    fi
    for ((i = ${#hugetlb_off_in[@]} - 1; i >= 0; i--)); do
        echo +hugetlb >"${hugetlb_off_in[i]}" ||
            echo "could not re-enable hugetlb in ${hugetlb_off_in[i]}" >&2
    done
    hugetlb_off_in=()
}
trap 'stop_containerd; restore_host' EXIT
start_containerd
import_busybox

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# bench NAME RUNTIME [extra ctr run flags...]: prints "NAME median_ms rss_kib anon_kib pss_kib"
# (dashes when the runtime does not run).
bench() {
    local name=$1 rt=$2; shift 2
    local times=() i t0 t1 id
    # Warm-up run (page cache, first shim exec); also tells whether the runtime works.
    if ! ctrn run --rm --runtime "$rt" "$@" "$BUSYBOX_REF" "bench-$name-warm" /bin/true >/dev/null 2>"$CTD_DIR/err"; then
        echo "$name: does not run: $(tail -1 "$CTD_DIR/err")" >&2
        echo "$name - - - -"
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

    # Memory of every shim process serving this container (a shim may fork a daemon).
    id=bench-$name-sleep
    ctrn run -d --runtime "$rt" "$@" "$BUSYBOX_REF" "$id" sleep 1000 >/dev/null
    sleep 1
    local rss=0 anon=0 pss=0 p
    for p in $(pgrep -f -- "containerd-shim.*-id $id( |$)" || true); do
        rss=$((rss + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
        anon=$((anon + $(awk '/^RssAnon:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
        pss=$((pss + $(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)))
    done
    ctrn task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    ctrn task delete -f "$id" >/dev/null 2>&1 || true
    ctrn containers rm "$id" >/dev/null 2>&1 || true
    echo "$name $median $rss $anon $pss"
}

results=()
# crun first, with hugetlb off cgroup2 (see above), then the host as it was for the others.
if [ -d "$unified" ] && ! hugetlb_off; then
    echo "crun: could not take hugetlb off $unified (in use?); crun will refuse to run" >&2
fi
crun_result=$(bench crun io.containerd.runc.v2 --runc-binary crun)
restore_host

if [ -x "$TANDEM_BIN_DIR/containerd-shim-tandem-v2" ]; then
    results+=("$(bench tandem io.containerd.tandem.v2)")
else
    echo "tandem: $TANDEM_BIN_DIR/containerd-shim-tandem-v2 not built" >&2
    results+=("tandem - - - -")
fi
results+=("$(bench runc io.containerd.runc.v2)")
results+=("$crun_result")

ratio() {
    if [ "$1" = - ] || [ -z "$2" ] || [ "$2" = - ] || [ "$2" = 0 ]; then
        echo -
    else
        awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", a/b}'
    fi
}
field() { printf '%s\n' "${results[@]}" | awk -v n="$1" -v f="$2" '$1==n {print $f}'; }
echo
echo "containerd $(containerd --version | awk '{print $3}'), $(uname -r), $(nproc) cpus, N=$n," \
    "load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-7s %9s %8s %8s %10s %8s %8s %9s %8s\n' runtime "run (ms)" "/runc" "/crun" \
    "RSS (KiB)" "/runc" "/crun" "anon KiB" "Pss KiB"
for r in "${results[@]}"; do
    read -r name ms rss anon pss <<<"$r"
    printf '%-7s %9s %8s %8s %10s %8s %8s %9s %8s\n' "$name" "$ms" \
        "$(ratio "$ms" "$(field runc 2)")" "$(ratio "$ms" "$(field crun 2)")" "$rss" \
        "$(ratio "$rss" "$(field runc 3)")" "$(ratio "$rss" "$(field crun 3)")" "$anon" "$pss"
done
