#!/usr/bin/env bash
# Training throughput and memory on ONE GPU (H100 / H200), about 2-4 minutes: the fused model's stage 1, stage 2
# (full, full with activation checkpointing, LoRA) and a single-model fine-tune in the same harness, on real
# specialist shapes with random bf16 weights and truncated depth (as deep as every mode fits the card, at most 8
# layers), with `ultrafuser plan`'s memory estimate next to each measured peak; then `ultrafuser plan` on every recipe.
#
#   OUT=/some/dir PYTHONPATH=src bash bench/gpu_train.sh
#
# Writes to $OUT (5 files): env.json; train_llama2-7b.json (3 x Llama-2-7B shape, batch 2 x 2048 tokens, all modes);
# train_qwen2.5-7b.json (3 x Qwen2.5-7B shape: GQA and a 152k vocabulary, batch 1 x 4096, stage 1 / LoRA / single);
# plans.json (every recipe on 8 x 80 GB, 1 x 80 GB, 1 x 141 GB); gpu_train.log (everything printed). The compact
# tables come last. Each part runs on its own: one failing does not stop the others (errors are in the JSON).
# pydantic is not in the GPU image: if it is missing, wheels from .whl/ are installed into /tmp/site (carry .whl;
# docs/benchmarks.md says how to fetch them).
set -u
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
OUT=${OUT:-out/gpu_train}
mkdir -p "$OUT"

main() {
  ensure_pydantic
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || true
  $PY - >"$OUT/env.json" <<'PYEOF'
import json, platform, torch, transformers
try:
    import peft; pv = peft.__version__
except Exception as e:  # noqa: BLE001
    pv = f"missing: {e}"
cuda = torch.cuda.is_available()
print(json.dumps({"device": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": pv,
                  "python": platform.python_version(),
                  "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2) if cuda else None},
                 indent=2))
PYEOF
  cat "$OUT/env.json"

  timeout 240 $PY bench/train.py --shape llama2-7b --device cuda --batch 2 --seq 2048 \
    --out "$OUT/train_llama2-7b.json"
  timeout 150 $PY bench/train.py --shape qwen2.5-7b --device cuda --batch 1 --seq 4096 \
    --modes single,stage1,stage2-lora --out "$OUT/train_qwen2.5-7b.json"

  $PY - >"$OUT/plans.json" <<'PYEOF'
import glob, json
from ultrafuser.plan import report
out = []
for f in sorted(glob.glob("configs/recipes/*/*.yaml")):
    for hw in (["--gpus", "8", "--gpu-memory", "80", "--sharding", "fsdp"], ["--gpus", "1", "--gpu-memory", "80"],
               ["--gpus", "1", "--gpu-memory", "141"]):
        try:
            out.append(report([f, *hw]))
        except Exception as e:  # noqa: BLE001
            out.append({"config": f, "hardware": hw, "error": f"{type(e).__name__}: {e}"})
print(json.dumps(out, indent=1))
PYEOF

  echo
  echo "==== training benchmark: peak memory vs ultrafuser plan's estimate (goal: plan/peak within 0.85-1.15)"
  for f in "$OUT"/train_*.json; do [ -f "$f" ] && $PY bench/train.py --summarize "$f"; done
}

main 2>&1 | tee "$OUT/gpu_train.log"
