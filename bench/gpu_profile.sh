#!/usr/bin/env bash
# Where the LoRA-shared fast decode step spends its time on one GPU (~2 minutes): bench/profile_decode.py on a
# Llama-2-7B shape truncated to 8 layers, LoRA r 16 on every linear layer (one base, an adapter per specialist),
# with the low-rank terms in the model dtype (lora_precision auto: the CUDA default) and in PEFT's fp32 (adapter),
# each checked against the reference path (--check); and one model at batch 16 and 48 for comparison.
#     OUT=/some/dir bash bench/gpu_profile.sh
set -u
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
OUT=${OUT:-out/gpu_profile}
mkdir -p "$OUT"
ensure_pydantic
{
  nvidia-smi --query-gpu=name,memory.total --format=csv
  for spec in "lora 16 auto --check" "lora 1 auto --check" "lora 16 adapter" "single 16 auto" "single 48 auto"; do
    set -- $spec
    echo "== mode $1 batch $2 lora_precision $3 ${4:-}"
    timeout 90 $PY bench/profile_decode.py --shape llama2-7b --layers 8 --mode "$1" --batch "$2" --steps 32 \
      --lora-precision "$3" ${4:-} --top 12 --json "$OUT/profile_$1_b$2_$3.json" 2>&1 | grep -v '^ *"\|^ *[{}]'
  done
} 2>&1 | tee "$OUT/gpu_profile.log"
