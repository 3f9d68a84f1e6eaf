#!/usr/bin/env bash
# Build an OCI image layout tar of a minimal busybox image from Debian's busybox-static.
#
#   deploy/images/build-busybox.sh OUT.tar [REF]
#
# REF defaults to docker.io/tandem/busybox:latest; it is stored as the
# org.opencontainers.image.ref.name annotation, so that
#   ctr -n NS images import OUT.tar
# (containerd 1.6, no --base-name) names the image REF.
# The output is reproducible (fixed mtimes, sorted entries, numeric owners, gzip -n). It is rebuilt
# only when its inputs (this script, the busybox binary, REF) change: OUT.inputs holds their hash.
set -euo pipefail

out=${1:?usage: build-busybox.sh OUT.tar [REF]}
ref=${2:-docker.io/tandem/busybox:latest}
busybox=${BUSYBOX:-/bin/busybox}

[ -x "$busybox" ] || { echo "build-busybox: $busybox not found (apt-get install busybox-static)" >&2; exit 1; }
if ! file_out=$(LC_ALL=C "$busybox" --list 2>/dev/null) || [ -z "$file_out" ]; then
    echo "build-busybox: $busybox --list failed" >&2; exit 1
fi

inputs=$( { sha256sum "$0" "$(dirname "$0")/oci-layout.sh" "$busybox" | cut -d' ' -f1; echo "$ref"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out" ] && [ -f "$out.inputs" ] && [ "$(cat "$out.inputs")" = "$inputs" ]; then
    exit 0
fi

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.busybox-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Root filesystem.
root=$work/rootfs
mkdir -p "$root"/{bin,etc,tmp,root,proc,sys,dev}
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] && continue
    ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"

# shellcheck source=deploy/images/oci-layout.sh
. "$(dirname "$0")/oci-layout.sh"
oci_image_from_root "$root" "$work" "$out" "$ref" \
    '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"}' \
    "tandem deploy/images/build-busybox.sh"
echo "$inputs" >"$out.inputs"
