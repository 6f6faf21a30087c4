#!/usr/bin/env bash
# Compile-checks the `cuda` feature without a GPU (CI runs this): installs the pinned CUDA 13.0
# toolkit from wheels (scripts/cuda-toolkit.sh), so kernels/*.cu really go through nvcc, then
# clippy with -D warnings over every target. Uses its own target folder (target/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/cuda-toolkit.sh
source .cache/cuda-toolkit/env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
cargo clippy --release --features cuda --all-targets -- -D warnings
