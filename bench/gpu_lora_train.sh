#!/usr/bin/env bash
# One short GPU run (~6 minutes on one H100 / H200, no network, no weights) for what the full runs left open:
#
#   OUT=/some/dir bash bench/gpu_lora_train.sh        # from the repository root; writes into $OUT
#
# 1. tiny shape in fp32 on CUDA, low-rank terms in the model dtype (--lora-precision model: each member's LoRA A
#    rides in the base's GEMM, (x·A)·B is added in place): the CUDA-graph path's greedy tokens must equal the
#    reference's exactly, dense and LoRA-shared (~20 s);
# 2. the LoRA-shared decode step at real shapes (Llama-2-7B, Qwen2.5-7B: one random bf16 base + two random r-16
#    adapters, full depth) against one model's step, fast path only, batch 1 and 16 (issue 8's ≤ 1.3x goal);
# 3. training (issue 9): bench/train.py on the Llama-2-7B shape (single, stage 1, stage 2 full and LoRA) with the
#    fused AdamW kernel, and the single-model fine-tune once more with the earlier unfused optimizer passes, in
#    the same run on the same card; then the Qwen2.5-7B shape if time remains.
# Every part writes its JSON as soon as it exists; one failing does not stop the others.
set -u
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
gpu_out_dir
TOTAL_S="${TOTAL_S:-420}"
START=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

{
  gpu_env_header

  echo "== 1. tiny fp32 on CUDA, LoRA terms in the model dtype (left $(left) s)"
  timeout 60 $PY bench/decode.py --shape tiny --device cuda --dtype float32 --batches 1,4 --vary \
      --prompt-len 64 --steps 128 --reps 1 --bw-gib 1 --lora-precision model --json "$OUT/tiny_cuda_fp32_lora_model.json"
  echo "tiny exit code $?"

  for shape in llama2-7b qwen2.5-7b; do
    echo "== 2. LoRA-shared decode, $shape (left $(left) s)"
    timeout 80 $PY bench/decode.py --shape $shape --device cuda --lora-only --paths fast --batches 1,16 \
        --prompt-len 256 --steps 128 --reps 3 --time-budget 70 --reserve-s 10 --json "$OUT/lora_$shape.json"
    echo "lora $shape exit code $?"
  done

  echo "== 3. training, llama2-7b (left $(left) s)"
  timeout 170 $PY bench/train.py --shape llama2-7b --device cuda --batch 2 --seq 2048 \
      --modes single,stage1,stage2-full,stage2-lora --out "$OUT/train_llama2-7b.json"
  echo "train exit code $?"
  timeout 60 $PY bench/train.py --shape llama2-7b --device cuda --batch 2 --seq 2048 --modes single \
      --unfused-adam --out "$OUT/train_llama2-7b_unfused.json"
  echo "train unfused exit code $?"
  L=$(left)
  if [ "$L" -gt 70 ]; then
    echo "== 3b. training, qwen2.5-7b (left $L s)"
    timeout $(( L - 10 )) $PY bench/train.py --shape qwen2.5-7b --device cuda --batch 1 --seq 4096 \
        --modes single,stage1,stage2-lora --out "$OUT/train_qwen2.5-7b.json"
    echo "train qwen exit code $?"
  fi

  echo "== tables"
  $PY bench/decode.py --print-table "$OUT"/lora_*.json "$OUT"/tiny_cuda_fp32_lora_model.json
  for f in "$OUT"/train_*.json; do [ -f "$f" ] && $PY bench/train.py --summarize "$f"; done
  echo "== done in $(( $(date +%s) - START )) s"
} 2>&1 | tee "$OUT/gpu_lora_train.log"
