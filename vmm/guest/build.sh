#!/usr/bin/env bash
# Build tandem's guest image: the Debian cloud kernel (unpacked, never installed on the host) and
# an initramfs whose /init is the static tandem-agent, with the kernel modules the agent loads.
#
# Idempotent and cached: the kernel package is downloaded and unpacked once per package name; the
# agent is rebuilt by cargo (a no-op when nothing changed); the initramfs is rewritten only when
# its content changes.
#
# Environment (all optional):
#   TANDEM_GUEST_DIR      cache/output dir       (default: <repo>/.tandem-build/guest)
#   TANDEM_KERNEL_PKG     kernel package name    (default: what linux-image-cloud-amd64 depends on)
#   CARGO_TARGET_DIR      cargo target dir       (default: <repo>/target-agent)
#   TANDEM_GUEST_BUSYBOX  1 = add /bin/busybox (debug shell + tools for tests), 0 = agent only (default 1)
#   TANDEM_AGENT_BIN      use this agent binary instead of building one
#   TANDEM_GUEST_NO_AGENT 1 = build an initramfs WITHOUT the agent (/init = busybox sh; for tests
#                         of a guest that never answers). Output name then ends in -noagent.
# Output: the last lines on stdout are KERNEL=…, INITRD=…, KERNEL_RELEASE=… (also written to
# $TANDEM_GUEST_DIR/guest.env, or guest-noagent.env).
set -euo pipefail

die() { echo "build.sh: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${TANDEM_GUEST_DIR:-$repo/.tandem-build/guest}
target_dir=${CARGO_TARGET_DIR:-$repo/target-agent}
busybox=${TANDEM_GUEST_BUSYBOX:-1}
no_agent=${TANDEM_GUEST_NO_AGENT:-0}
triple=x86_64-unknown-linux-gnu

# Modules the guest needs (names as in modules.dep, '-' and '_' are the same). Their dependencies
# are added from each module's own `depends=` modinfo field.
wanted=(virtio virtio_ring virtio_pci virtio_mmio virtio_console virtio_blk virtio_net
        vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
        erofs overlay veth macvlan ipvlan 8021q vrf tun)

for tool in apt-get apt-cache dpkg-deb cpio gzip find sort; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
mkdir -p "$out"

# --- 1. kernel ---------------------------------------------------------------------------------
pkg=${TANDEM_KERNEL_PKG:-}
if [[ -z $pkg ]]; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
          awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [[ -n $pkg ]] || die "cannot resolve the package linux-image-cloud-amd64 depends on (apt-get update?)"
fi
kroot=$out/kernel/$pkg
if [[ ! -f $kroot/.complete ]]; then
    log "downloading and unpacking $pkg"
    tmp=$(mktemp -d "$out/.dl.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    chmod 0777 "$tmp"  # lets apt's _apt user write (no "unsandboxed" warning)
    (cd "$tmp" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
    deb=$(ls "$tmp"/*.deb) || die "no .deb downloaded for $pkg"
    mkdir "$tmp/root"
    dpkg-deb -x "$deb" "$tmp/root"
    rm -rf "$kroot"
    mkdir -p "$out/kernel"
    mv "$tmp/root" "$kroot"
    touch "$kroot/.complete"
    rm -rf "$tmp"
    trap - EXIT
fi
vmlinuz=$(ls "$kroot"/boot/vmlinuz-* 2>/dev/null | head -n1)
[[ -f $vmlinuz ]] || die "no /boot/vmlinuz-* in $kroot"
krel=${vmlinuz##*/vmlinuz-}
moddir=$kroot/lib/modules/$krel
[[ -d $moddir ]] || die "no modules dir $moddir"

# --- 2. agent ----------------------------------------------------------------------------------
agent=${TANDEM_AGENT_BIN:-}
if [[ $no_agent != 1 && -z $agent ]]; then
    # Static and not position-independent: the agent is re-executed as the init of every
    # container and exec, and a fixed load address lets QEMU's TCG reuse the code it translated
    # for earlier processes of the same binary (with ASLR every exec is translated anew): under
    # TCG a pod's second container is created in ~50 ms instead of ~100 ms, the first ~30 ms
    # sooner (docs/vm-mode.md, "Where the pod start spends its time"). The cost: the agent's own
    # code and data are at a fixed address in the guest (its stack, heap and mmaps, and every
    # container program, keep ASLR); the agent serves only the host, over virtio-serial.
    log "building tandem-agent (static, non-PIE)"
    (cd "$repo" &&
        CARGO_TARGET_DIR=$target_dir \
        RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static' \
        LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
        cargo build -q --release -p tandem-agent --bin tandem-agent --target $triple >&2) ||
        die "cargo build of tandem-agent failed"
    agent=$target_dir/$triple/release/tandem-agent
fi
if [[ $no_agent != 1 ]]; then
    [[ -x $agent ]] || die "agent binary $agent missing"
    if command -v file >/dev/null && ! file -L "$agent" | grep -q 'static'; then
        die "agent binary $agent is not statically linked: $(file -L "$agent")"
    fi
fi

# --- 3. modules and their dependency closure ------------------------------------------------------
declare -A path_of=()   # module name -> path relative to $moddir
while IFS= read -r rel; do
    name=${rel##*/}; name=${name%.ko}; name=${name//-/_}
    path_of[$name]=$rel
done < <(cd "$moddir" && find kernel -name '*.ko')
builtin_of() { grep -q "/${1//_/[-_]}\.ko\$" "$moddir/modules.builtin"; }
deps_of() { tr '\0' '\n' < "$moddir/${path_of[$1]}" | sed -n 's/^depends=//p' | tr ',' ' '; }

declare -A seen=()
order=()   # dependencies before dependents
visit() {
    local m=${1//-/_} d
    [[ -n ${seen[$m]:-} ]] && return 0
    seen[$m]=1
    if [[ -z ${path_of[$m]:-} ]]; then
        builtin_of "$m" && return 0
        die "module $m: neither a .ko in $moddir nor built in"
    fi
    for d in $(deps_of "$m"); do visit "$d"; done
    order+=("$m")
}
for m in "${wanted[@]}"; do visit "$m"; done
boot_order=("${order[@]}")
# In the image with their dependencies, but loaded on demand by the agent, not at boot:
# virtiofs (+ fuse) for directory volumes (vmm/agent/src/volumes.rs).
on_demand=(virtiofs)
for m in "${on_demand[@]}"; do visit "$m"; done

# --- 4. initramfs ------------------------------------------------------------------------------
suffix=""; [[ $no_agent == 1 ]] && suffix="-noagent"
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{proc,sys,dev,run,tmp,etc,bin,sbin,mnt,lib/modules/"$krel"}
chmod 1777 "$stage/tmp"
if [[ $busybox == 1 || $no_agent == 1 ]]; then
    bb=$(command -v busybox) || die "busybox (busybox-static) not installed"
    file -L "$bb" 2>/dev/null | grep -q static || log "warning: $bb may not be static"
    cp "$bb" "$stage/bin/busybox"
    for a in sh cat ls echo uname mount poweroff; do ln -s busybox "$stage/bin/$a"; done
fi
if [[ $no_agent == 1 ]]; then
    # A guest that boots but never answers on the agent port.
    # With tandem_poweroff=1 on the kernel command line it powers off at once instead (to time a
    # bare boot to init).
    cat > "$stage/init" <<'INIT'
#!/bin/busybox sh
[ "$tandem_poweroff" = 1 ] && exec /bin/busybox poweroff -f
/bin/busybox mount -t proc proc /proc
exec /bin/busybox sleep 3600
INIT
    chmod 0755 "$stage/init"
else
    install -m 0755 "$agent" "$stage/init"
    # Symbols are not needed in the guest (saves ~1 MiB unpacked).
    command -v strip >/dev/null && strip "$stage/init"
fi
: > "$stage/lib/modules/$krel/modules.dep"
for m in "${order[@]}"; do
    rel=${path_of[$m]}
    mkdir -p "$stage/lib/modules/$krel/${rel%/*}"
    cp "$moddir/$rel" "$stage/lib/modules/$krel/$rel"
    deps=""
    for d in $(deps_of "$m"); do
        d=${d//-/_}
        [[ -n ${path_of[$d]:-} ]] && deps+=" ${path_of[$d]}"
    done
    echo "$rel:$deps" >> "$stage/lib/modules/$krel/modules.dep"
done
# The modules the agent loads at boot, in dependency order (not the on-demand ones).
printf '%s\n' "${boot_order[@]}" > "$stage/lib/modules/$krel/modules.load"

initrd=$out/initramfs-$krel$suffix.cpio.gz
tmpimg=$(mktemp "$out/.initrd.XXXXXX")
# Fixed timestamps: same inputs, same bytes (so an unchanged image is not rewritten).
find "$stage" -mindepth 1 -exec touch -h -d @0 {} +
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner=0:0 --reproducible | gzip -n -6) > "$tmpimg"
if [[ -f $initrd ]] && cmp -s "$tmpimg" "$initrd"; then
    rm -f "$tmpimg"
else
    chmod 0644 "$tmpimg"; mv "$tmpimg" "$initrd"
    log "wrote $initrd ($(du -h "$initrd" | cut -f1))"
fi
rm -rf "$stage"
trap - EXIT

env_file=$out/guest$suffix.env
printf 'KERNEL=%s\nINITRD=%s\nKERNEL_RELEASE=%s\n' "$vmlinuz" "$initrd" "$krel" | tee "$env_file.tmp"
mv "$env_file.tmp" "$env_file"
