#!/usr/bin/env bash
# Full check of the project, as CI runs it (root, Debian 12): setup, format, lints, release
# build of the shim, all tests (integration tests drive a private containerd with the release shim).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/deploy/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"

set -x
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --release -p tandem-shim
# Integration tests each start their own containerd; two at a time fits 2 cores.
cargo test --workspace --release -- --test-threads="${TANDEM_TEST_THREADS:-2}"
