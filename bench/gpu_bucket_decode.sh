#!/usr/bin/env bash
# One short GPU run (~7 minutes on one H100 / H200, no network, no weights) for the CUDA graphs' attention
# buckets: the default grows with the context (fast.attention_length: 32-slot steps up to 511 filled slots, then
# 1/8 of the length's power of two) where it was a fixed 128 (384 slots read at every step from 257 to 384).
#
#   OUT=/some/dir bash bench/gpu_bucket_decode.sh        # from the repository root; writes into $OUT
#
# 1. tiny shape in fp32 on CUDA (CUDA graphs): greedy tokens of the fast path, dense and LoRA-shared, with the
#    default buckets and with the fixed 128 (--also-bucket 128), must equal the reference's exactly;
# 2. the LoRA-shared decode step, Llama-2-7B shape (one random bf16 base + three random r-16 adapters, full depth)
#    against one model's step, batch 1 and 16, default buckets and fixed 128 side by side (issue 8's ≤ 1.3x goal);
# 3. the dense fused step, Llama-2-7B shape (three random bf16 models), batch 16, fast path, both bucket ways;
# 4. as 2 for the Qwen2.5-7B shape.
# Every part writes its JSON as soon as it exists; one failing does not stop the others.
set -u
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
gpu_out_dir
START=$(date +%s)

{
  gpu_env_header

  echo "== 1. tiny fp32 on CUDA"
  timeout 100 $PY bench/decode.py --shape tiny --device cuda --dtype float32 --batches 1,4 --vary \
      --prompt-len 64 --steps 128 --reps 1 --bw-gib 1 --also-bucket 128 --json "$OUT/tiny_cuda_fp32.json"
  echo "tiny exit code $?"

  echo "== 2. LoRA-shared decode, llama2-7b ($(( $(date +%s) - START )) s in)"
  timeout 130 $PY bench/decode.py --shape llama2-7b --device cuda --lora-only --paths fast --batches 1,16 \
      --prompt-len 256 --steps 128 --reps 3 --also-bucket 128 --time-budget 120 --reserve-s 10 \
      --json "$OUT/lora_llama2-7b.json"
  echo "lora llama2-7b exit code $?"

  echo "== 3. dense fused decode, llama2-7b, batch 16 ($(( $(date +%s) - START )) s in)"
  timeout 150 $PY bench/decode.py --shape llama2-7b --device cuda --paths fast --batches 16 --lora-rank 0 \
      --prompt-len 256 --steps 128 --reps 2 --also-bucket 128 --time-budget 140 --reserve-s 10 \
      --json "$OUT/dense_llama2-7b.json"
  echo "dense llama2-7b exit code $?"

  echo "== 4. LoRA-shared decode, qwen2.5-7b ($(( $(date +%s) - START )) s in)"
  timeout 120 $PY bench/decode.py --shape qwen2.5-7b --device cuda --lora-only --paths fast --batches 1,16 \
      --prompt-len 256 --steps 128 --reps 3 --also-bucket 128 --time-budget 110 --reserve-s 10 \
      --json "$OUT/lora_qwen2.5-7b.json"
  echo "lora qwen2.5-7b exit code $?"

  echo "== tables"
  $PY bench/decode.py --print-table "$OUT"/*.json
  echo "== done in $(( $(date +%s) - START )) s"
} 2>&1 | tee "$OUT/gpu_bucket_decode.log"
