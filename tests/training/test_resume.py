"""Exact resume (reliability.md, Training): kills, SIGTERM, refusal of a changed run.

The reference run and the interrupted runs are forked children of this process (so a real SIGKILL can
hit them mid-step or mid-write); fp32 on the CPU, so every per-step value after a resume must be
bit-identical (floats in metrics.jsonl compared exactly).
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainkit import exact_view, one_intraop_thread, read_jsonl, run_forked, run_inproc, train_config

from ultrafuser.training import checkpoint as ck
from ultrafuser.training.loop import EXIT_INTERRUPTED

STAGES = {"stage1__steps": 4, "stage2__steps": 3}  # 7 steps; the switch after step 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fused_dir, data_file):
    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = train_config(out, fused_dir, data_file, keep_last=10, **STAGES)
    with one_intraop_thread():  # (module fixtures start before the autouse one)
        assert run_forked(cfg) == 0
    return out


def assert_same_run(out, ref):
    got, want = read_jsonl(out / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(1, 8))
    assert exact_view(got) == exact_view(want)  # every loss, gate weight, lr, grad norm: bit-identical
    got_s, want_s = read_jsonl(out / "samples.jsonl"), read_jsonl(ref / "samples.jsonl")
    assert got_s == want_s  # same examples in the same steps: no duplicate, no skip
    for s in got_s:
        for ids in s["ids"].values():
            assert len(set(ids)) == len(ids)
    a = load_file(str(out / "checkpoints" / "step-00000007" / "model.safetensors"))
    b = load_file(str(ref / "checkpoints" / "step-00000007" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(out / "checkpoints" / "step-00000007" / "optimizer.safetensors"))
    b = load_file(str(ref / "checkpoints" / "step-00000007" / "optimizer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("gate.safetensors", "specialists/code/adapter_model.safetensors"):
        a, b = load_file(str(out / "final" / name)), load_file(str(ref / "final" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_and_resumed_runs_are_bit_identical(reference, tmp_path, fused_dir, data_file):
    out = tmp_path / "run"
    cfg = train_config(out, fused_dir, data_file, **STAGES)
    # 1. SIGKILL inside gradient accumulation of step 3 (after its first micro-batch's backward)
    assert run_forked(cfg, env={"ULTRAFUSER_FAULT": "accum@3=kill"}) == -9
    assert ck.find_checkpoint(out / "checkpoints").step == 2
    # 2. resume; SIGKILL while checkpoint 4 is being written
    assert run_forked(cfg, env={"ULTRAFUSER_FAULT": "ckpt_write@4=kill"}, resume=True) == -9
    assert any(p.name.startswith(".tmp-step-00000004") for p in (out / "checkpoints").iterdir())
    assert ck.find_checkpoint(out / "checkpoints").step == 3  # the half-written one is not picked up
    # 3. resume; SIGKILL at the stage-1 -> stage-2 switch (stage 2 set up, no step taken)
    assert run_forked(cfg, env={"ULTRAFUSER_FAULT": "stage2_start=kill"}, resume=True) == -9
    last = ck.find_checkpoint(out / "checkpoints")
    assert last.step == 4 and last.json("trainer_state.json")["stage"] == 1
    # 4. resume to the end
    assert run_forked(cfg, resume=True) == 0
    assert_same_run(out, reference)


def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(reference, tmp_path, fused_dir, data_file, monkeypatch):
    out = tmp_path / "run"
    cfg = train_config(out, fused_dir, data_file, **STAGES)
    monkeypatch.setenv("ULTRAFUSER_FAULT", "accum@6=sigterm")  # the signal arrives in the middle of step 6
    assert run_inproc(cfg) == EXIT_INTERRUPTED
    assert ck.find_checkpoint(out / "checkpoints").step == 6  # step 6 was finished, then saved
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, 7))
    monkeypatch.delenv("ULTRAFUSER_FAULT")
    assert run_inproc(cfg, resume=True) == 0
    assert_same_run(out, reference)


def test_resume_refuses_a_changed_run_unless_forced(reference, tmp_path, fused_dir, shared_dir, data_file):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with pytest.raises(ck.CheckpointError, match=r"stage2\.lr: 0\.01 -> 0\.02"):
        run_inproc(train_config(out, fused_dir, data_file, stage2__lr=0.02, **STAGES), resume=True)
    other = tmp_path / "other.jsonl"
    other.write_text(Path(data_file).read_text().replace("hello", "hullo"))
    with pytest.raises(ck.CheckpointError, match="training data changed"):
        run_inproc(train_config(out, fused_dir, str(other), **STAGES), resume=True)
    with pytest.raises(ck.CheckpointError, match="fused model or its specialists changed"):
        run_inproc(train_config(out, shared_dir, data_file, **STAGES), resume=True)
    # forced: accepted (the run is complete, so it only re-exports)
    assert run_inproc(train_config(out, fused_dir, data_file, stage2__lr=0.02, **STAGES), resume=True, force=True) == 0


def test_resume_without_a_checkpoint_is_an_error_and_a_used_dir_is_not_overwritten(reference, tmp_path, fused_dir,
                                                                                     data_file):
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        run_inproc(train_config(tmp_path / "empty", fused_dir, data_file, **STAGES), resume=True)
    from ultrafuser.config import ConfigError

    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run_inproc(train_config(reference, fused_dir, data_file, **STAGES))
