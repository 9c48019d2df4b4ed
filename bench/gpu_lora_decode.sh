#!/usr/bin/env bash
# One short GPU run (~5 minutes on one H100 / H200, no network, no weights) for the LoRA-shared decode step after
# the shared LM head moved behind the fusion (FastFusedDecoder(mix_before_head=True): the members' hidden states
# are mixed by the gate weights and go through the head once per prompt):
#
#   OUT=/some/dir bash bench/gpu_lora_decode.sh        # from the repository root; writes into $OUT
#
# 1. tiny shape in fp32 on CUDA (CUDA graphs): greedy tokens of the fast path, dense and LoRA-shared, with the
#    mixed head and with every member's head (--also-member-heads), must equal the reference's exactly; once with
#    the adapters' precision (the fp32 default) and once with the low-rank terms in the model dtype;
# 2. the LoRA-shared decode step at real shapes (Llama-2-7B, Qwen2.5-7B: one random bf16 base + a random r-16
#    adapter per specialist — three since 2026-11-27, two before —, full depth) against one model's step, batch 1
#    and 16, the mixed head and the member heads side by side (issue 8's ≤ 1.3x goal).
# Every part writes its JSON as soon as it exists; one failing does not stop the others.
set -u
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
gpu_out_dir
START=$(date +%s)

{
  gpu_env_header

  echo "== 1. tiny fp32 on CUDA"
  timeout 90 $PY bench/decode.py --shape tiny --device cuda --dtype float32 --batches 1,4 --vary \
      --prompt-len 64 --steps 128 --reps 1 --bw-gib 1 --also-member-heads --json "$OUT/tiny_cuda_fp32.json"
  echo "tiny exit code $?"
  timeout 60 $PY bench/decode.py --shape tiny --device cuda --dtype float32 --batches 1,4 --vary --lora-only \
      --prompt-len 64 --steps 128 --reps 1 --bw-gib 1 --also-member-heads --lora-precision model \
      --json "$OUT/tiny_cuda_fp32_lora_model.json"
  echo "tiny lora-model exit code $?"

  for shape in llama2-7b qwen2.5-7b; do
    echo "== 2. LoRA-shared decode, $shape ($(( $(date +%s) - START )) s in)"
    timeout 110 $PY bench/decode.py --shape $shape --device cuda --lora-only --paths fast --batches 1,16 \
        --prompt-len 256 --steps 128 --reps 3 --also-member-heads --time-budget 100 --reserve-s 10 \
        --json "$OUT/lora_$shape.json"
    echo "lora $shape exit code $?"
  done

  echo "== tables"
  $PY bench/decode.py --print-table "$OUT"/tiny_cuda_fp32*.json "$OUT"/lora_*.json
  echo "== done in $(( $(date +%s) - START )) s"
} 2>&1 | tee "$OUT/gpu_lora_decode.log"
