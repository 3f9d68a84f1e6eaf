#!/usr/bin/env bash
# Demo: set up the machine, build the shim, start a private containerd, import the busybox
# image and run a container with the tandem runtime. Run as root: deploy/demo.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/deploy/setup.sh"
# shellcheck source=deploy/lib.sh
. "$repo/deploy/lib.sh"
trap stop_containerd EXIT

start_containerd
echo "== containerd $(containerd --version | awk '{print $3}') on $CTD_SOCK"
import_busybox
echo "== imported $BUSYBOX_REF"

id=demo-$$
cmd=(sh -c 'echo "hello from a tandem container"; echo "pid in container: $$"; hostname; grep -E "^(0|[0-9]+:memory):" /proc/self/cgroup')
echo "== ctr run --rm --runtime io.containerd.tandem.v2 $BUSYBOX_REF $id ${cmd[*]}"
rc=0
ctrn run --rm --runtime io.containerd.tandem.v2 "$BUSYBOX_REF" "$id" "${cmd[@]}" || rc=$?
echo "== exit code $rc"

# == VM demo ==
# The same image as a VM pod: tandem boots a QEMU VM (KVM where the host can boot a stock guest
# kernel, TCG otherwise) with the guest image setup.sh installed in /usr/share/tandem/guest (the
# [vm] defaults, which deploy/tandem-vm.toml names) and runs the container inside.
vm_cfg="$repo/deploy/tandem-vm.toml"
KERNEL_RELEASE=$(cat /usr/share/tandem/guest/kernel-release)
vm_id=demo-vm-$$
vm_cmd=(sh -c 'echo "hello from a tandem VM pod"; echo "kernel: $(uname -r)"; echo "cpus: $(grep -c ^processor /proc/cpuinfo)"')
echo "== ctr run --rm --runtime io.containerd.tandem.v2 --runtime-config-path $vm_cfg $BUSYBOX_REF $vm_id ${vm_cmd[*]}"
echo "   (guest kernel $KERNEL_RELEASE, host kernel $(uname -r))"
vm_rc=0
start=$(date +%s.%N)
ctrn run --rm --runtime io.containerd.tandem.v2 --runtime-config-path "$vm_cfg" \
    "$BUSYBOX_REF" "$vm_id" "${vm_cmd[@]}" || vm_rc=$?
echo "== exit code $vm_rc ($(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }') s, VM boot included)"
[[ $rc == 0 ]] && rc=$vm_rc

echo "== stopping containerd"
exit "$rc"
