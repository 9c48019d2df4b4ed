#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then runs the main job on the embedded default: fuse the three SmolLM2
# specialists, train the gate (stage 1) and briefly everything (stage 2), evaluate, write runs/embedded/.
# Extra args go to `ultrafuser embedded run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/ultrafuser embedded run "$@"
