#!/usr/bin/env bash
# Quickstart: fetch all-MiniLM-L6-v2 and SpamAssassin, build, and train a DP-LoRA spam classifier
# at ε = 3, δ = 1e-5. Outputs go to runs/quickstart/release/ (adapter, certificate, privacy report) and
# runs/quickstart/private/ (seed, keys, per-step metrics: never publish).
# Extra arguments go to dptrain (e.g. --overwrite to replace an earlier quickstart run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-assets.sh
cargo build --release
./target/release/dptrain --config configs/quickstart.toml "$@"
echo "release (publishable): runs/quickstart/release/  (report: runs/quickstart/release/privacy_report.md)"
echo "private (never publish): runs/quickstart/private/"
