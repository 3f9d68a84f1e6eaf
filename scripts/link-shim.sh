#!/usr/bin/env bash
# Linker driver for the shim's binary (set by scripts/rustc-static-shim.sh with `-C linker=`): runs
# `cc` with the arguments rustc gives, plus an lld symbol ordering file that puts the functions a
# container-mode shim server runs first in .text, contiguous, so that the long-running server maps
# ~1.3 MiB of text instead of most of the binary's 6 MB (the kernel's fault-around maps 64 KiB
# around each touched page: scattered hot code maps nearly everything). docs/benchmarks.md.
#
# The list, scripts/shim-hot-symbols.txt, holds symbol names recorded from a running shim
# (scripts/shim-hot-symbols.sh). Names change: thin LTO's `.llvm.<n>` suffix changes whenever the
# crate's code does, the legacy `17h<hash>E` suffix when dependencies or features change. So each
# listed name is matched against the symbols the input objects define: exactly; else without the
# `.llvm.<n>` suffix; else (hash changed) every symbol equal up to the hash (all monomorphizations
# of that generic function). A name matching nothing is passed on as it is (libc's functions are in
# libc.a, which is not scanned: their names have no suffix). A stale list only costs memory, never
# correctness: lld just orders sections.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
list=${TANDEM_SHIM_HOT_SYMBOLS:-$here/shim-hot-symbols.txt}
cc=${TANDEM_SHIM_CC:-cc}

out=
prev=
objs=()
for arg in "$@"; do
    [ "$prev" = -o ] && out=$arg
    case $arg in
    *.o | *.rlib) [ -f "$arg" ] && objs+=("$arg") ;;
    esac
    prev=$arg
done
if [ ! -f "$list" ] || [ -z "$out" ] || [ ${#objs[@]} = 0 ]; then
    exec "$cc" "$@"
fi

order=$out.symbol-order
nm --defined-only -P "${objs[@]}" 2>/dev/null | awk '$2 ~ /^[tTwW]$/ {print $1}' |
    awk -v list="$list" '
    function nollvm(s) { sub(/\.llvm\.[0-9]+$/, "", s); return s }
    function nohash(s) { s = nollvm(s); sub(/17h[0-9a-f]+E$/, "", s); return s }
    { have[$1] = 1; k1 = nollvm($1); by1[k1] = by1[k1] " " $1; k2 = nohash($1); by2[k2] = by2[k2] " " $1 }
    END {
        while ((getline name < list) > 0) {
            if (name == "" || name ~ /^#/) continue
            if (name in have) { emit(name); continue }
            k = nollvm(name)
            if (k in by1) { emitall(by1[k]); continue }
            k = nohash(name)
            if (k in by2) { emitall(by2[k]); continue }
            emit(name)
        }
    }
    function emit(s) { if (!(s in done)) { done[s] = 1; print s } }
    function emitall(l,   n, a, i) { n = split(l, a, " "); for (i = 1; i <= n; i++) emit(a[i]) }
    ' >"$order"
exec "$cc" "$@" -Wl,--symbol-ordering-file="$order" -Wl,--no-warn-symbol-ordering
