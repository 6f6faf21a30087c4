#!/usr/bin/env bash
# The test command (README): fetch the pinned assets the reference tests need, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-assets.sh
cargo test --release "$@"
