#!/usr/bin/env bash
# The SmolLM2 GPU checks (issue 4/5), run on a lent GPU machine from the repository root after
# scripts/gpu-pack.sh staged the CUDA binary and the SmolLM2 GGUF in two carries (the device
# upload limit is below the GGUF's size): `.gpu-a/` (binary + first GGUF part) is copied to
# .gpu-stage/ by a first call, `.gpu-b/` (second part + Moby-Dick data) by this one.
#   1. reassemble and sha256-check the GGUF, convert it with `dptrain convert` on the machine;
#   2. `dptrain bench` on the SmolLM2-135M shape, DP vs non-private;
#   3. configs/smollm2-lm.toml on cuda, DP (ε = 8) and non-private, perplexity before/after.
# Logs go to $OUT (default ./gpu-out).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT" .gpu-stage
cp .gpu-b/* .gpu-stage/
dirs=""
for l in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10; do
  p=$(find /usr/local/cuda*/ /usr/local/lib /opt /usr/lib -name "$l" 2>/dev/null | head -n1)
  [[ -n "$p" ]] && dirs="$dirs:$(dirname "$p")"
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
S=.gpu-stage
D=/tmp/dptrain
gunzip -c $S/dptrain.gz >"$D" && chmod +x "$D"
cat $S/gguf.part-* >/tmp/smollm2.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smollm2.gguf" | sha256sum -c || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
"$D" convert --gguf /tmp/smollm2.gguf --out /tmp/smollm2 --overwrite 2>&1 | tee "$OUT/convert.txt"
mkdir -p /tmp/moby
gunzip -c $S/moby-train.jsonl.gz >/tmp/moby/train.jsonl
gunzip -c $S/moby-test.jsonl.gz >/tmp/moby/test.jsonl
sed -e 's#^path = .*#path = "/tmp/smollm2"#' -e 's#^train = .*#train = "/tmp/moby/train.jsonl"#' \
  -e 's#^test = .*#test = "/tmp/moby/test.jsonl"#' configs/smollm2-lm.toml >/tmp/smollm2-lm.toml
B=("$D" bench --device cuda --steps 10 --warmup 2)
{
  timeout 60 "${B[@]}" --shape smollm2-135m --batch 32 --seq-len 128 --json "$OUT/bench-smollm2.json"
  timeout 40 "${B[@]}" --shape smollm2-135m --batch 32 --seq-len 128 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
} 2>&1 | tee "$OUT/bench-smollm2.txt"
{
  echo "== DP (configs/smollm2-lm.toml on cuda, base weights bf16)"
  time DPTRAIN_TIMING=1 timeout 110 "$D" --config /tmp/smollm2-lm.toml --out /tmp/run-dp 2>&1
  cp /tmp/run-dp/release/privacy_report.json "$OUT/privacy_report_dp.json"
  echo "== non-private, same config"
  time DPTRAIN_TIMING=1 timeout 90 "$D" --config /tmp/smollm2-lm.toml --out /tmp/run-np --non-private 2>&1
  cp /tmp/run-np/release/privacy_report.json "$OUT/privacy_report_np.json"
  echo "== eval of the DP adapter (greedy samples)"
  timeout 30 "$D" eval --model /tmp/smollm2 --adapter /tmp/run-dp --data /tmp/moby/test.jsonl --device cuda \
    --prompt "Call me Ishmael." --prompt "The whale" --max-new-tokens 24 2>&1
} 2>&1 | tee "$OUT/smollm2-lm.txt"
