"""The adapter recipe (`ultrafuser embedded train-adapter`): a run killed right after a checkpoint resumes and
ends with exactly the adapter of an uninterrupted run; a checkpoint of another recipe is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, base, name, steps=4, lr=1e-3):
    data = tmp_path / "math-train.jsonl"
    if not data.is_file():
        data.write_text("".join(json.dumps({"id": f"m{i}", "domain": "math", "source": "test", "messages": [
            {"role": "user", "content": f"Tom has {i} apples and buys 3 more. How many?"},
            {"role": "assistant", "content": f"Step 1: {i} + 3 = {i + 3}.\nThe answer is {i + 3}."}]}) + "\n"
            for i in range(10)))
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"domain: math\nbase: {base}\ntrain: [{data}]\nout: {tmp_path / name / 'adapter'}\nseed: 3\n"
                   f"steps: {steps}\nbatch_size: 3\nlr: {lr}\nwarmup_steps: 1\nmax_length: 128\nlora_r: 4\n"
                   f"lora_alpha: 8\nthreads: 1\nsave_every: 2\ncheckpoint_dir: {tmp_path / name / 'ckpt'}\n")
    return cfg


def _train(cfg, fault=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("ULTRAFUSER_FAULT", None)
    if fault:
        env["ULTRAFUSER_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "ultrafuser.cli", "embedded", "train-adapter", str(cfg)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_adapter_recipe_resumes_exactly(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    whole = _recipe(tmp_path, tiny_dir["text"], "whole")
    r = _train(whole)
    assert r.returncode == 0, r.stderr[-2000:]
    crashed = _recipe(tmp_path, tiny_dir["text"], "crashed")
    r = _train(crashed, fault="adapter_saved@2=kill")
    assert r.returncode == -9  # killed right after its step-2 checkpoint
    assert not (tmp_path / "crashed" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "crashed" / "ckpt").is_dir()
    r = _train(crashed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming the math adapter at step 2" in r.stderr
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert (a[k] == b[k]).all(), k
    ra = json.loads((tmp_path / "whole" / "adapter" / "recipe.json").read_text())
    rb = json.loads((tmp_path / "crashed" / "adapter" / "recipe.json").read_text())
    assert ra["final_loss_mean_last5"] == rb["final_loss_mean_last5"]
    assert not (tmp_path / "crashed" / "ckpt").exists()  # removed once the adapter is written


def test_adapter_recipe_refuses_a_foreign_checkpoint(tiny_dir, tmp_path):
    cfg = _recipe(tmp_path, tiny_dir["text"], "one")
    assert _train(cfg, fault="adapter_saved@2=kill").returncode == -9
    other = _recipe(tmp_path, tiny_dir["text"], "one", lr=5e-4)  # same folders, another learning rate
    r = _train(other)
    assert r.returncode != 0
    assert "was made by another recipe or other data" in r.stderr and "ckpt" in r.stderr
