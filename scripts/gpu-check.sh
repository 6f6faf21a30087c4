#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine from the repository root, with .gpu/ made here by
# scripts/gpu-pack.sh: the kernel-vs-CPU self-test, `dptrain bench` DP vs non-private, and the
# quickstart trained on the GPU (DP and non-private). Logs go to $OUT (default ./gpu-out).
set -uo pipefail
# QUICKSTART_ONLY=N: skip the selftest and benches, run the DP quickstart N times (unseeded).
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
# The binary links the CUDA 13 runtime libraries dynamically: find the machine's copies.
dirs=""
for l in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10; do
  p=$(find /usr/local/cuda*/ /usr/local/lib /opt /usr/lib -name "$l" 2>/dev/null | head -n1)
  [[ -n "$p" ]] && dirs="$dirs:$(dirname "$p")"
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
D=/tmp/dptrain
gunzip -c .gpu/dptrain.gz >"$D" && chmod +x "$D"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  ldd "$D" | grep -E "cuda|cublas|curand|not found"
} 2>&1 | tee "$OUT/env.txt"

mkdir -p /tmp/data
gunzip -c .gpu/data/train.jsonl.gz >/tmp/data/train.jsonl
gunzip -c .gpu/data/test.jsonl.gz >/tmp/data/test.jsonl
sed -e 's#^path = .*#path = ".gpu/minilm-bf16"#' -e 's#^train = .*#train = "/tmp/data/train.jsonl"#' \
  -e 's#^test = .*#test = "/tmp/data/test.jsonl"#' configs/quickstart.toml >/tmp/quickstart-gpu.toml
if [[ -n "${QUICKSTART_ONLY:-}" ]]; then
  for i in $(seq "$QUICKSTART_ONLY"); do
    echo "== DP run $i"
    timeout 150 "$D" --config /tmp/quickstart-gpu.toml --device cuda --out "/tmp/run-$i" 2>&1 | tail -n 2
    cp "/tmp/run-$i/release/privacy_report.json" "$OUT/privacy_report_$i.json"
  done 2>&1 | tee "$OUT/quickstart.txt"
  exit 0
fi

"$D" selftest --device cuda --json "$OUT/selftest.json" 2>&1 | tee "$OUT/selftest.txt"

B=("$D" bench --device cuda --steps 20 --warmup 3)
ALL=query,key,value,attention.output.dense,intermediate.dense,output.dense
{
  "${B[@]}" --shape minilm-l6 --batch 32 --seq-len 128 --json "$OUT/bench.json"
  "${B[@]}" --shape minilm-l6 --batch 32 --seq-len 128 --dtype f32
  "${B[@]}" --shape minilm-l6 --batch 128 --seq-len 128
  "${B[@]}" --shape minilm-l6 --batch 64 --seq-len 128 --targets "$ALL"
  "${B[@]}" --shape bert-base --batch 32 --seq-len 128
  "${B[@]}" --shape bert-base --batch 32 --seq-len 128 --targets "$ALL"
  "${B[@]}" --model .gpu/minilm-bf16 --batch 32 --seq-len 128
} 2>&1 | tee "$OUT/bench.txt"

{
  echo "== DP (configs/quickstart.toml on cuda, base weights bf16)"
  time DPTRAIN_TIMING=1 timeout 150 "$D" --config /tmp/quickstart-gpu.toml --device cuda --out /tmp/run-dp 2>&1
  cp /tmp/run-dp/release/privacy_report.json "$OUT/privacy_report.json"
  echo "== non-private, same config"
  time DPTRAIN_TIMING=1 timeout 150 "$D" --config /tmp/quickstart-gpu.toml --device cuda --out /tmp/run-np --non-private 2>&1
} 2>&1 | tee "$OUT/quickstart.txt"
