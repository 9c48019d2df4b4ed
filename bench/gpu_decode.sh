#!/usr/bin/env bash
# The one GPU run for fused decoding (issue 8): ~6-8 minutes on one H100 / H200, no network, no weights needed.
#
#   OUT=/some/dir bash bench/gpu_decode.sh          # from the repository root; writes into $OUT
#
# 1. tiny shape in fp32 on CUDA: the CUDA-graph path's greedy tokens must equal the reference exactly (~20 s);
# 2. Llama-2-7B shapes (3 × random bf16 models), then Qwen2.5-7B shapes only if time remains: naive-single,
#    naive-fused (the core's reference path), fast-single, fast-fused (+ fast-fused-refs where weights were
#    copied) at batch 1 and 16, batch 64 on the fast path where memory allows, then the LoRA-shared phase.
# Every measurement is written to JSON as soon as it exists (a timeout keeps them); the table comes last.
# The teacher-forced logits check runs first for each shape (before any timing): fast (bmm decode attention) and
# fast-sdpa vs the reference, calibrated by the same reference with HF eager attention and by the top-1/top-2 gap.
# pydantic (needed by ultrafuser.config) is not in the GPU image: like bench/gpu_train.sh, the wheels in .whl/ are
# installed into /tmp/site when it is missing — carry .whl/ (git-ignored) with the working tree.
set -u
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
gpu_out_dir
TOTAL_S="${TOTAL_S:-450}"  # wall-clock budget for everything below
START=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
LOG="$OUT/gpu_decode.log"

{
  ensure_pydantic
  echo "== env $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | head -3
  $PY - <<'PY'
import torch, transformers
try:
    import peft; pv = peft.__version__
except Exception as e:
    pv = f"missing ({e})"
print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", pv,
      "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY

  echo "== 1. tiny fp32 on CUDA (graph path exactness)"
  timeout 75 $PY bench/decode.py --shape tiny --device cuda --dtype float32 --batches 1,4 --vary \
      --prompt-len 64 --steps 128 --reps 1 --bw-gib 1 --also-sdpa --json "$OUT/tiny_cuda_fp32.json"
  echo "tiny exit code $?"

  B=$(( $(left) - 25 ))
  echo "== 2. 7B shapes, bf16 (budget ${B}s)"
  timeout $(( B + 20 )) $PY bench/decode.py --shape llama2-7b --shape qwen2.5-7b --device cuda \
      --batches 1,16 --extra-batches 64 --prompt-len 256 --steps 128 --reps 3 --naive-reps 1 --also-refs --also-sdpa \
      --time-budget "$B" --reserve-s 25 --json "$OUT/decode_gpu.json"
  echo "7B exit code $?"
} 2>&1 | tee "$LOG"

[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"  # the block above ran in a subshell
$PY bench/decode.py --print-table "$OUT/tiny_cuda_fp32.json" "$OUT/decode_gpu.json" 2>&1 | tee "$OUT/table.txt"
echo "elapsed $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
