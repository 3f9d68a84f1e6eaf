#!/usr/bin/env bash
# Set up a Debian 12 machine for tandem: system packages, then a release build of the shim.
# Idempotent; run as root. Installs nothing into the host's containerd configuration (the
# tests, demo and benchmark start their own private containerd).
#
#   sudo deploy/setup.sh            # packages + cargo build --release -p tandem-shim
#                                   # + the VM-mode guest image in /usr/share/tandem/guest
#   TANDEM_SKIP_BUILD=1 deploy/setup.sh   # packages only
#   TANDEM_SKIP_GUEST=1 deploy/setup.sh   # no guest image
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (sudo $0)" >&2
    exit 1
fi

# What tandem, its tests, demo and benchmark use:
#   containerd (+ctr, containerd-shim-runc-v2), runc, crun   container runtimes to drive/compare
#   busybox-static                                            the test/demo image
#   containernetworking-plugins, iproute2                     CNI + netns for pod networking
#   libseccomp-dev, pkg-config, gcc, libc6-dev, make         building the shim: it is linked
#                                                             static-pie (libseccomp.a, libc.a;
#                                                             .cargo/config.toml)
#   protobuf-compiler                                         ttrpc/agent protocol code generation
#   erofs-utils, cpio, lz4, qemu-system-x86                   microVM guest images and boot tests
#   jq, tar, gzip, coreutils                                  the image builder (deploy/images)
#   util-linux, bsdutils, procps                              script(1), mount tools, ps
#   git, ca-certificates                                      cargo fetching from crates.io
packages=(
    containerd runc crun busybox-static containernetworking-plugins iproute2
    libseccomp-dev pkg-config gcc libc6-dev make protobuf-compiler
    erofs-utils cpio lz4 qemu-system-x86 jq tar gzip coreutils
    util-linux bsdutils procps git ca-certificates
)

missing=()
for p in "${packages[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "setup.sh: all ${#packages[@]} packages present"
fi

if [ "${TANDEM_SKIP_BUILD:-0}" = 1 ]; then
    exit 0
fi

# Rust: the stable toolchain must already be installed (rustup is not reachable here).
if ! command -v cargo >/dev/null 2>&1; then
    for d in "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin}" /root/.cargo/bin; do
        [ -n "$d" ] && [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
    done
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo not found; install a stable Rust toolchain (rustup) first" >&2
    exit 1
fi

cd "$repo"
cargo build --release -p tandem-shim
shim="${CARGO_TARGET_DIR:-$repo/target}/release/containerd-shim-tandem-v2"
# the shim is built static-pie by scripts/rustc-static-shim.sh (see .cargo/config.toml); a
# RUSTC_WORKSPACE_WRAPPER in the environment would replace that wrapper
if ldd "$shim" 2>&1 | grep -q '=>'; then
    echo "setup.sh: $shim is dynamically linked (is RUSTC_WORKSPACE_WRAPPER set?):" >&2
    ldd "$shim" >&2 || true
    exit 1
fi
echo "setup.sh: built $shim (static-pie)"

# The guest image of VM mode where the [vm] defaults (and deploy/tandem-vm.toml) look for it:
# vmm/guest/build.sh unpacks Debian's cloud kernel package (apt-get download, never installed on
# the host) and makes an initramfs whose /init is the static agent (cached in .tandem-build/guest;
# the tests build the same image there).
guest_dir=/usr/share/tandem/guest
if [ "${TANDEM_SKIP_GUEST:-0}" != 1 ]; then
    guest_env=$("$repo/vmm/guest/build.sh" | grep -E '^(KERNEL|INITRD|KERNEL_RELEASE)=')
    eval "$guest_env"
    install -d -m 0755 "$guest_dir"
    # beside, then renamed: a VM starting meanwhile reads a whole old or a whole new file
    install -m 0644 "$KERNEL" "$guest_dir/.vmlinuz.tmp"
    install -m 0644 "$INITRD" "$guest_dir/.initramfs.cpio.gz.tmp"
    mv -f "$guest_dir/.vmlinuz.tmp" "$guest_dir/vmlinuz"
    mv -f "$guest_dir/.initramfs.cpio.gz.tmp" "$guest_dir/initramfs.cpio.gz"
    echo "$KERNEL_RELEASE" > "$guest_dir/kernel-release"
    echo "setup.sh: guest image (kernel $KERNEL_RELEASE) installed in $guest_dir"
fi
