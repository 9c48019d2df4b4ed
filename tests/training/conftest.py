"""Fixtures for the training tests: a fused directory of tiny specialists (dense, and LoRA on a shared base)
and a small training file. Helpers are in trainkit.py."""

from __future__ import annotations

import pytest
from trainkit import fuse_dir, make_records, one_intraop_thread

DOMAINS = ("text", "code", "math")


@pytest.fixture(autouse=True)
def one_thread():
    with one_intraop_thread():
        yield


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> str:
    from ultrafuser.data.records import write_records

    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_records(make_records(), p)
    return str(p)


@pytest.fixture(scope="session")
def fused_dir(tiny_dir, tmp_path_factory) -> str:
    """Three dense tiny specialists, a fresh (untrained) learned gate."""
    out = tmp_path_factory.mktemp("fused") / "dense"
    return fuse_dir(out, [f"{d}={tiny_dir[d]}" for d in DOMAINS])


@pytest.fixture(scope="session")
def shared_dir(tiny_dir, tmp_path_factory) -> str:
    """text = a base model; code and math = LoRA adapters on that same base (one model in memory)."""
    out = tmp_path_factory.mktemp("fused") / "shared"
    base = tiny_dir["text"]
    return fuse_dir(out, [f"text={base}", f"code={base}+{tiny_dir['lora_code']}",
                          f"math={base}+{tiny_dir['lora_math']}"])


