"""Checkpoints are atomic, verified and pickle-free; optimizer and RNG state round-trip exactly."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ultrafuser.training import checkpoint as ck


def files(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.safetensors": {"gate.w": torch.randn(4, 3, generator=g), "gate.b": torch.randn(3, generator=g)},
        "trainer_state.json": {"step": seed, "note": "x"},
    }


def test_save_load_verify_and_rotation(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, files(step), keep_last=2)
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [2, 3]
    c = ck.find_checkpoint(tmp_path)
    assert c.step == 3
    assert torch.equal(c.tensors("model.safetensors")["gate.w"], files(3)["model.safetensors"]["gate.w"])
    assert c.json("trainer_state.json") == {"step": 3, "note": "x"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("action", ["raise", "enospc"])
def test_failure_while_writing_leaves_no_complete_checkpoint(tmp_path, monkeypatch, action):
    ck.save_checkpoint(tmp_path, 4, files(4), keep_last=2)
    monkeypatch.setenv("ULTRAFUSER_FAULT", f"ckpt_write@5={action}")
    with pytest.raises((RuntimeError, OSError)):
        ck.save_checkpoint(tmp_path, 5, files(5), keep_last=2)
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [4]
    assert ck.find_checkpoint(tmp_path).step == 4  # the previous one still loads (and verifies)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]  # the temp dir was removed


def test_sigkill_while_writing_leaves_no_complete_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path, 4, files(4), keep_last=2)
    pid = os.fork()
    if pid == 0:
        os.environ["ULTRAFUSER_FAULT"] = "ckpt_write@5=kill"
        try:
            ck.save_checkpoint(tmp_path, 5, files(5), keep_last=2)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # a half-written checkpoint is on disk ...
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [4]  # ... and is not picked up
    assert ck.find_checkpoint(tmp_path).step == 4
    ck.save_checkpoint(tmp_path, 5, files(5), keep_last=2)  # the next save cleans it up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_flipped_byte_is_detected(tmp_path):
    ck.save_checkpoint(tmp_path, 1, files(1), keep_last=2)
    ck.save_checkpoint(tmp_path, 2, files(2), keep_last=2)
    p = tmp_path / "step-00000002" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors does not match its checksum"):
        ck.find_checkpoint(tmp_path)
    assert ck.find_checkpoint(tmp_path, str(tmp_path / "step-00000001")).step == 1


def test_non_finite_values_are_never_saved(tmp_path):
    bad = files(1)
    bad["model.safetensors"]["gate.w"][0, 0] = float("nan")
    with pytest.raises(ck.NonFiniteError, match="gate.w"):
        ck.save_checkpoint(tmp_path, 1, bad, keep_last=2)
    assert ck.list_checkpoints(tmp_path) == []


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.find_checkpoint(tmp_path / "checkpoints")


def test_optimizer_and_rng_state_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    names = {id(p): n for n, p in net.named_parameters()}

    def make_opt():
        ps = list(net.parameters())
        return torch.optim.AdamW([{"params": ps[::2], "weight_decay": 0.1}, {"params": ps[1::2], "weight_decay": 0.0}],
                                 lr=1e-2, foreach=False)

    def step(opt):
        opt.zero_grad()
        net(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()

    opt = make_opt()
    step(opt)
    t, meta = ck.optimizer_files(opt, names)
    rt, rmeta = ck.rng_files()
    ck.save_checkpoint(tmp_path, 1, {"optimizer.safetensors": t, "optimizer.json": meta, "rng.safetensors": rt,
                                     "rng.json": rmeta, "model.safetensors": dict(net.named_parameters())}, 2)
    saved_params = {n: p.detach().clone() for n, p in net.named_parameters()}
    step(opt)
    want = [p.detach().clone() for p in net.parameters()]
    want_rand = (torch.rand(3), np.random.rand(), __import__("random").random())

    c = ck.find_checkpoint(tmp_path)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(saved_params[n])
    opt2 = make_opt()
    ck.load_optimizer(opt2, names, c.tensors("optimizer.safetensors"), c.json("optimizer.json"))
    ck.set_rng(c.tensors("rng.safetensors"), c.json("rng.json"))
    step(opt2)
    assert all(torch.equal(a, b) for a, b in zip(want, net.parameters()))
    got_rand = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(want_rand[0], got_rand[0]) and want_rand[1:] == got_rand[1:]


def test_no_pickle_in_training_code():
    root = Path(__file__).resolve().parents[2] / "src" / "ultrafuser"
    paths = list((root / "training").rglob("*.py")) + [root / "data" / "sampler.py", root / "data" / "loading.py"]
    for p in paths:
        text = p.read_text()
        assert "import pickle" not in text and "torch.save(" not in text, p
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), (p, m.group(0))
