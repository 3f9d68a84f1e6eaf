#!/usr/bin/env bash
# Build the pod sandbox image: tandem-pause (deploy/pause), linked static, as an OCI layout tar.
#
#   deploy/images/build-pause.sh OUT.tar [REF]
#
# REF defaults to localhost/tandem/pause:latest, the `sandbox_image` of tandem's CRI config (no
# registry is reachable, so the image is built and imported locally). Rebuilt only when its
# inputs change (OUT.inputs holds their hash).
set -euo pipefail

out=${1:?usage: build-pause.sh OUT.tar [REF]}
ref=${2:-localhost/tandem/pause:latest}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"

# A static binary: the image holds this one file. Its own target dir, since --target and
# RUSTFLAGS would otherwise invalidate the workspace's normal build.
target=$repo/target/static
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release -p tandem-pause \
    --target x86_64-unknown-linux-gnu --target-dir "$target" --manifest-path "$repo/Cargo.toml"
bin=$target/x86_64-unknown-linux-gnu/release/tandem-pause

inputs=$( { sha256sum "$0" "$here/oci-layout.sh" "$bin" | cut -d' ' -f1; echo "$ref"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out" ] && [ -f "$out.inputs" ] && [ "$(cat "$out.inputs")" = "$inputs" ]; then
    exit 0
fi

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.pause-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs"
install -m 0755 "$bin" "$work/rootfs/pause"

# shellcheck source=deploy/images/oci-layout.sh
. "$here/oci-layout.sh"
oci_image_from_root "$work/rootfs" "$work" "$out" "$ref" '{"Entrypoint":["/pause"],"WorkingDir":"/"}' \
    "tandem deploy/images/build-pause.sh"
echo "$inputs" >"$out.inputs"
