#!/usr/bin/env bash
# Installs a CUDA 13.0 toolkit from pinned PyPI wheels into .cache/cuda-toolkit (ignored), so that
# `--features cuda` builds on machines without a GPU or a system CUDA (see docs/ARCHITECTURE.md,
# "CUDA build"). Idempotent. Prints nothing but progress; source .cache/cuda-toolkit/env.sh after.
#
# Why these pins: 13.0 matches the GPU machines' driver (580); the -cu12 wheels have no nvcc; newer
# 13.x emits PTX the driver refuses. The wheels ship only versioned library names and no driver
# library, so we add unversioned links and a link-time stand-in libcuda.so (never loaded at run time:
# the GPU machine's real driver is).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD/.cache/cuda-toolkit"
VENV="$ROOT/venv"
STAMP="$ROOT/.complete-v1"
if [[ -f "$STAMP" ]]; then
  echo "cuda-toolkit: already installed in $ROOT"
  exit 0
fi
mkdir -p "$ROOT"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
TK="$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)"
[[ -x "$TK/bin/nvcc" ]] || { echo "cuda-toolkit: no nvcc under $TK" >&2; exit 1; }
# nvcc looks for cicc under nvvm/bin relative to its own bin/ (the nvvm wheel puts it there).
for lib in cublas cublasLt cudart curand nvrtc; do
  so="$(ls "$TK/lib/lib$lib.so."* 2>/dev/null | sort | head -n1 || true)"
  [[ -n "$so" ]] || { echo "cuda-toolkit: lib$lib.so.* missing in $TK/lib" >&2; exit 1; }
  ln -sf "$(basename "$so")" "$TK/lib/lib$lib.so"
done
# Link-time stand-in for the driver library: every driver entry point cudarc binds, each returning
# CUDA_ERROR_NO_DEVICE (100). Soname libcuda.so.1, like the real one, which replaces it at run time.
mkdir -p "$TK/lib/stubs"
CUDARC_SRC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -n1 || true)"
if [[ -z "$CUDARC_SRC" ]]; then
  cargo fetch -q
  CUDARC_SRC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -n1)"
fi
grep -ohE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$CUDARC_SRC/src/driver/sys/mod.rs" \
  | sed -E 's/.* fn //' | sort -u | sed -E 's/(.*)/int \1(void) { return 100; }/' >"$ROOT/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$ROOT/libcuda_stub.c"
cat >"$ROOT/env.sh" <<ENV
# Source me before \`cargo build --features cuda\` (written by scripts/cuda-toolkit.sh).
export CUDA_ROOT="$TK" CUDA_PATH="$TK" CUDA_HOME="$TK"
export PATH="$TK/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export NVCC_CCBIN="\${NVCC_CCBIN:-/usr/bin/g++}"
export LIBRARY_PATH="$TK/lib:$TK/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export RUSTFLAGS="\${RUSTFLAGS:-} -L native=$TK/lib -L native=$TK/lib/stubs"
ENV
"$TK/bin/nvcc" --version | tail -n2
touch "$STAMP"
echo "cuda-toolkit: installed in $ROOT (source $ROOT/env.sh)"
