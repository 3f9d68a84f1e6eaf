#!/usr/bin/env bash
# (bash, not sh: dash drops environment variables whose names are not shell identifiers, such as
# cargo's CARGO_BIN_EXE_<bin-name> that integration tests read with env!())
# Cargo's rustc wrapper for this workspace's own crates (`build.rustc-workspace-wrapper` in
# .cargo/config.toml); cargo runs it as `rustc-static-shim.sh <rustc> <args...>`.
#
# It changes one compilation only: the shim's binary (`containerd-shim-tandem-v2`, not its unit
# tests) is linked as a static-pie executable, so that a plain `cargo build --release -p
# tandem-shim` gives the static shim (no ld.so, no shared libc/libm/libgcc_s/libseccomp at each of
# the 3-4 execs per container, less resident memory per shim; docs/benchmarks.md). It adds
#   -C target-feature=+crt-static   to that crate only: RUSTFLAGS would also reach build scripts and
#                                    proc macros (which cannot be static) unless --target is given;
#   -L native=<dir>                 a directory holding only libseccomp.a, which the linker finds
#                                    before the system's libseccomp.so (libseccomp-sys asks for
#                                    -lseccomp; all -L dirs are searched before the default ones).
#   -C link-arg=-Wl,-z,pack-relative-relocs
#                                    RELR relocations (glibc >= 2.36 applies them in a static-pie):
#                                    .rela.dyn shrinks from 460 KiB, all read at each start and left
#                                    resident, to 6 KiB of .relr.dyn;
#   -C linker=scripts/link-shim.sh   cc plus an lld symbol ordering file that puts the functions the
#                                    shim server runs first and contiguous in .text (see that script).
# Every other crate, dependencies included (not workspace members: cargo does not wrap them),
# compiles exactly as without this wrapper. `cargo clippy` replaces it with clippy-driver.
set -eu
rustc=$1
shift

crate=
bin=0
unit_test=0
out_dir=
target=
prev=
for arg in "$@"; do
    case $prev in
    --crate-name) crate=$arg ;;
    --crate-type) [ "$arg" = bin ] && bin=1 ;;
    --out-dir) out_dir=$arg ;;
    --target) target=$arg ;;
    esac
    [ "$arg" = --test ] && unit_test=1
    prev=$arg
done

if [ "$crate" != containerd_shim_tandem_v2 ] || [ $bin = 0 ] || [ $unit_test = 1 ] ||
    [ -z "$out_dir" ] || { [ -n "$target" ] && [ "$target" != x86_64-unknown-linux-gnu ]; }; then
    exec "$rustc" "$@"
fi

if [ -n "${LIBSECCOMP_LIB_PATH:-}" ]; then
    archive=$LIBSECCOMP_LIB_PATH/libseccomp.a
else
    archive=$(${CC:-cc} -print-file-name=libseccomp.a 2>/dev/null || true)
fi
case $archive in
/*) ;;
*) archive= ;;
esac
if [ -z "$archive" ] || [ ! -f "$archive" ]; then
    echo "rustc-static-shim.sh: libseccomp.a not found (${LIBSECCOMP_LIB_PATH:+in LIBSECCOMP_LIB_PATH=$LIBSECCOMP_LIB_PATH, }looked up with '${CC:-cc} -print-file-name=libseccomp.a'); the static shim needs it: apt-get install libseccomp-dev" >&2
    exit 1
fi
lib_dir=$out_dir/../tandem-static-libs
mkdir -p "$lib_dir"
ln -sf "$archive" "$lib_dir/libseccomp.a"

here=$(cd "$(dirname "$0")" && pwd)
exec "$rustc" "$@" -C target-feature=+crt-static -L "native=$lib_dir" \
    -C link-arg=-Wl,-z,pack-relative-relocs -C "linker=$here/link-shim.sh"
