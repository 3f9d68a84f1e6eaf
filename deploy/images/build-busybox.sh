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

inputs=$( { sha256sum "$0" "$busybox" | cut -d' ' -f1; echo "$ref"; } | sha256sum | cut -d' ' -f1)
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

layout=$work/layout
blobs=$layout/blobs/sha256
mkdir -p "$blobs"

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"
layer_digest=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$blobs/$layer_digest"

# blob FILE -> prints "digest size" after moving FILE into blobs/.
blob() {
    local d s
    d=$(sha256sum "$1" | cut -d' ' -f1)
    s=$(stat -c %s "$1")
    mv "$1" "$blobs/$d"
    echo "$d $s"
}

jq -cn --arg diff "sha256:$diff_id" '{
  architecture: "amd64", os: "linux", created: "1970-01-01T00:00:00Z",
  config: {Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], Cmd: ["sh"], WorkingDir: "/"},
  rootfs: {type: "layers", diff_ids: [$diff]},
  history: [{created: "1970-01-01T00:00:00Z", created_by: "tandem deploy/images/build-busybox.sh"}]
}' >"$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")

jq -cn --arg cd "sha256:$config_digest" --argjson cs "$config_size" \
       --arg ld "sha256:$layer_digest" --argjson ls "$layer_size" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
  layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls}]
}' >"$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

jq -cn --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg ref "$ref" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
               platform: {architecture: "amd64", os: "linux"},
               annotations: {"org.opencontainers.image.ref.name": $ref}}]
}' >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$layout" -cf "$work/image.tar" oci-layout index.json blobs
mv "$work/image.tar" "$out"
echo "$inputs" >"$out.inputs"
echo "build-busybox: wrote $out ($ref, manifest sha256:$manifest_digest)" >&2
