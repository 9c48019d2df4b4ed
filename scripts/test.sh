#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite offline. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's chromium for the serving page's browser test (skipped outside CI when it cannot be installed).
bash scripts/setup-browser.sh || echo "warning: chromium could not be installed; the browser test will be skipped" >&2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -m "not slow and not gpu" -q "$@"
