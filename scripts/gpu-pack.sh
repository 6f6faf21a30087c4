#!/usr/bin/env bash
# Builds the CUDA binary here (no GPU needed) and packs what scripts/gpu-check.sh needs on a GPU
# machine into .gpu/ (ignored by git; carried by the device tool): the gzipped binary, the
# MiniLM model with bf16 weights (to fit the upload limit) and the SpamAssassin data; and for
# scripts/gpu-llm.sh the SmolLM2 GGUF split over .gpu-a/ (with the binary) and .gpu-b/ (with the
# Moby-Dick data), each under the upload limit: carry .gpu-a in a first call that copies it to
# .gpu-stage/ (`mkdir -p .gpu-stage && cp .gpu-a/* .gpu-stage/`), then .gpu-b running gpu-llm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/cuda-toolkit.sh
bash scripts/fetch-assets.sh
(
  source .cache/cuda-toolkit/env.sh
  export CARGO_TARGET_DIR=target/cuda CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
  cargo build --release --features cuda
)
rm -rf .gpu && mkdir -p .gpu/minilm-bf16 .gpu/data
strip -o .gpu/dptrain target/cuda/release/dptrain && gzip -9 .gpu/dptrain
M=.cache/models/all-MiniLM-L6-v2
cp "$M/config.json" "$M/tokenizer.json" .gpu/minilm-bf16/
python3 scripts/to_bf16_safetensors.py "$M/model.safetensors" .gpu/minilm-bf16/model.safetensors
gzip -c .cache/data/spamassassin/train.jsonl >.gpu/data/train.jsonl.gz
gzip -c .cache/data/spamassassin/test.jsonl >.gpu/data/test.jsonl.gz
rm -rf .gpu-a .gpu-b && mkdir -p .gpu-a .gpu-b
cp .gpu/dptrain.gz .gpu-a/
split -b 40M -d .cache/models/smollm2-135m-gguf/SmolLM2-135M-Instruct.Q4_1.gguf .gpu-a/gguf.part-
mv .gpu-a/gguf.part-0[12] .gpu-b/
gzip -c .cache/data/moby-dick/train.jsonl >.gpu-b/moby-train.jsonl.gz
gzip -c .cache/data/moby-dick/test.jsonl >.gpu-b/moby-test.jsonl.gz
du -sh .gpu .gpu-a .gpu-b
