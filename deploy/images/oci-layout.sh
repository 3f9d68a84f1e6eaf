# shellcheck shell=bash
# Shared by the image builders: write a single-layer OCI image layout tar from a root directory.
#
#   oci_image_from_root ROOT WORK OUT REF IMAGE_CONFIG_JSON BUILT_BY
#
# ROOT becomes the one layer; IMAGE_CONFIG_JSON is the image's `config` object (Env, Cmd,
# Entrypoint, ...); the index names the image REF (org.opencontainers.image.ref.name), so that
# `ctr images import OUT` (containerd 1.6, no --base-name) names it REF. Reproducible: fixed
# mtimes, sorted entries, numeric owners, gzip -n. WORK is a scratch directory.
oci_image_from_root() {
    local root=$1 work=$2 out=$3 ref=$4 image_config=$5 built_by=$6
    local layout=$work/layout
    local blobs=$layout/blobs/sha256
    mkdir -p "$blobs"

    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        -C "$root" -cf "$work/layer.tar" .
    local diff_id layer_digest layer_size
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

    jq -cn --arg diff "sha256:$diff_id" --argjson cfg "$image_config" --arg by "$built_by" '{
      architecture: "amd64", os: "linux", created: "1970-01-01T00:00:00Z",
      config: $cfg,
      rootfs: {type: "layers", diff_ids: [$diff]},
      history: [{created: "1970-01-01T00:00:00Z", created_by: $by}]
    }' >"$work/config.json"
    local config_digest config_size manifest_digest manifest_size
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
    echo "$(basename "$0"): wrote $out ($ref, manifest sha256:$manifest_digest)" >&2
}
