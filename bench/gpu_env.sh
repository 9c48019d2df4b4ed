# Sourced by the bench/gpu_*.sh scripts (not run on its own): makes `ultrafuser` importable on the GPU machine.
# pydantic (needed by ultrafuser.config) is not in the GPU image and the machine has no network: when it is
# missing, the wheels in .whl/ (git-ignored; carry them with the working tree — docs/benchmarks.md says how to
# fetch them) are installed into /tmp/site and added to PYTHONPATH. Source it from the repository root: it also
# puts src/ on PYTHONPATH, keeps every library offline and quiet, and sets $PY (default: $PYTHON or python3).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ensure_pydantic() {
  local py=${PY:-python3}
  if $py -c "import pydantic" 2>/dev/null; then
    return 0
  fi
  if ls .whl/pydantic-*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site" && echo "pydantic installed from .whl/ into /tmp/site"
  else
    echo "WARNING: pydantic is missing and .whl/ holds no wheels for it: ultrafuser cannot be imported"
  fi
}
# ensure_pydantic, then the run's header: date, the card (name, memory, driver) and the library versions
gpu_env_header() {
  ensure_pydantic
  echo "== env $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | head -3
  ${PY:-python3} -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name())"
}
# the decode scripts' output folder ($OUT, default bench_out) and CUDA allocator setting (expandable segments)
gpu_out_dir() {
  OUT="${OUT:-bench_out}"
  mkdir -p "$OUT"
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
}
