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

# == microVM demo ==
# (to be added: the same image run as a KVM microVM pod through the tandem-vm handler)

echo "== stopping containerd"
exit "$rc"
