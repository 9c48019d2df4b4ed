import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from tinymodels import make_llama, make_lora, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Three tiny specialists sharing one tokenizer (+ a LoRA pair on one base)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    paths = {
        "text": make_llama(root / "text", tok, seed=1),
        "code": make_llama(root / "code", tok, seed=2),
        "math": make_llama(root / "math", tok, seed=3),
        "wide": make_llama(root / "wide", tok, seed=4, hidden=48),
    }
    paths["lora_code"] = make_lora(paths["text"], root / "lora_code", seed=5)
    paths["lora_math"] = make_lora(paths["text"], root / "lora_math", seed=6)
    paths["root"] = str(root)
    return paths
