"""fp32 master weights for bf16 specialists in stage 2 (`stage2.master_weights`, default true): updates smaller
than bf16's resolution accumulate instead of rounding away; checkpoints hold the fp32 values (exact resume); the
exported specialists are bf16 again."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainkit import read_jsonl, run_forked, run_inproc, train_config

from ultrafuser.cli import main as cli_main

DOMAINS = ("text", "code", "math")


@pytest.fixture(scope="module")
def bf16_dir(tiny_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fused") / "bf16"
    args = ["fuse", "--out", str(out), "--dtype", "bfloat16"]
    for d in DOMAINS:
        args += ["--specialist", f"{d}={tiny_dir[d]}"]
    assert cli_main(args) == 0
    return str(out)


def stage2(out, model, data, **over):
    # lr 1e-5: AdamW moves each weight by ~1e-5 per step, far below bf16's relative resolution (2^-8) at the tiny
    # models' weight scale, so in bf16 nearly every update rounds away
    kw = dict(precision="bf16", stage1__steps=0, stage2__steps=3, stage2__trainable="full", stage2__lr=1e-5,
              stage2__per_domain=1, stage2__micro_batch=3, keep_last=5)
    return train_config(out, model, data, **{**kw, **over})


def weights_in(d) -> dict:
    files = sorted(Path(d).glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def test_master_weights_keep_small_updates_and_export_bf16(tmp_path, bf16_dir, tiny_dir, data_file, caplog):
    caplog.set_level("INFO")
    init = weights_in(tiny_dir["text"])
    runs = {}
    for master in (True, False):
        out = tmp_path / f"master-{master}"
        assert run_inproc(stage2(out, bf16_dir, data_file, stage2__master_weights=master)) == 0
        runs[master] = out
    assert "fp32 master weights for" in caplog.text and "bfloat16 parameter tensors" in caplog.text
    ck_m = load_file(str(runs[True] / "checkpoints" / "step-00000003" / "model.safetensors"))
    ck_b = load_file(str(runs[False] / "checkpoints" / "step-00000003" / "model.safetensors"))
    key = next(k for k in ck_m if k.startswith("models.0.") and k.endswith("mlp.up_proj.weight"))
    hf_key = key.removeprefix("models.0.")
    start = init[hf_key].to(torch.bfloat16)
    assert ck_m[key].dtype == torch.float32 and ck_b[key].dtype == torch.bfloat16
    moved_master = (ck_m[key] != start.float()).float().mean().item()
    moved_bf16 = (ck_b[key] != start).float().mean().item()
    print(f"weights moved: master {moved_master:.3f}, bf16 {moved_bf16:.3f}")
    assert moved_master > 0.9, moved_master  # every weight carries its updates in fp32
    assert moved_bf16 < 0.5 * moved_master, (moved_bf16, moved_master)  # most rounded away in bf16
    # the export is bf16 again: the master values rounded once
    meta = json.loads((runs[True] / "final" / "ultrafuser.json").read_text())
    text = next(s for s in meta["config"]["specialists"] if s["domain"] == "text")
    exported = weights_in(runs[True] / "final" / text["path"])
    assert exported[hf_key].dtype == torch.bfloat16
    assert torch.equal(exported[hf_key], ck_m[key].to(torch.bfloat16))
    m = read_jsonl(runs[True] / "metrics.jsonl")
    assert [x["stage"] for x in m] == [2, 2, 2] and all(x["loss"] == x["loss"] for x in m)


def test_master_weights_resume_exactly(tmp_path, bf16_dir, data_file):
    ref = tmp_path / "ref"
    assert run_forked(stage2(ref, bf16_dir, data_file)) == 0
    out = tmp_path / "run"
    cfg = stage2(out, bf16_dir, data_file)
    assert run_forked(cfg, env={"ULTRAFUSER_FAULT": "accum@2=kill"}) == -9
    assert run_forked(cfg, resume=True) == 0
    a = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    b = load_file(str(ref / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in read_jsonl(out / "metrics.jsonl")] == [x["loss"] for x in read_jsonl(ref / "metrics.jsonl")]
