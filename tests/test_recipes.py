"""Every shipped run config validates, every recipe plans as its header says, and the training bench runs on a CPU.

Rule for which YAMLs are training configs: everything under configs/recipes/ and configs/train/ (recursively) is a
`TrainConfig`; other folders of configs/ hold other kinds (configs/accelerate/: accelerate and DeepSpeed configs,
configs/data/: data-build configs) and are checked by their own tests.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ultrafuser.config import TrainConfig, load_yaml
from ultrafuser.plan import report

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DIRS = [ROOT / "configs" / "recipes", ROOT / "configs" / "train"]
TRAIN_YAMLS = sorted(p for d in TRAIN_DIRS if d.is_dir() for p in d.rglob("*.y*ml"))
RECIPES = sorted((ROOT / "configs" / "recipes").rglob("*.yaml"))
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")


def test_there_are_recipes_for_both_trios():
    names = {str(p.relative_to(ROOT / "configs" / "recipes")) for p in RECIPES}
    for trio in ("paper-trio", "qwen25-trio"):
        assert {
            f"{trio}/stage1.yaml",
            f"{trio}/stage2.yaml",
            f"{trio}/stage1-1gpu.yaml",
            f"{trio}/stage2-lora-1gpu.yaml",
        } <= names


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_train_config_validates(path):
    cfg = load_yaml(path, TrainConfig)
    assert cfg.output_dir


def header_commands(path: Path, prefix: str) -> list[list[str]]:
    """Every `prefix ...` command in the YAML's comment header, split like a shell would."""
    found = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(rf"#\s+({re.escape(prefix)}\b.*)", line)
        if m:
            found.append(shlex.split(m.group(1)))
    assert found, f"{path}: no '{prefix} ...' command in the header"
    return found


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs" / "recipes")))
def test_recipe_header_names_hardware_and_commands(path):
    head = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "# Hardware:" in head
    train = "accelerate launch" in head or "ultrafuser train" in head
    assert train and "ultrafuser eval" in head and "ultrafuser serve" in head
    if "accelerate launch" in head:  # multi-GPU recipes run with FSDP and with DeepSpeed ZeRO-3
        assert "configs/accelerate/fsdp.yaml" in head and "configs/accelerate/deepspeed_zero3.yaml" in head
    rel = str(path.relative_to(ROOT))
    assert all(cmd[2] == rel for cmd in header_commands(path, "ultrafuser plan"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs" / "recipes")))
def test_recipe_plans_and_fits_the_hardware_its_header_names(path):
    cmd, *more = header_commands(path, "ultrafuser plan")
    for extra in more:  # e.g. the ZeRO-3 variant with its micro-batch override: it fits too
        rep = report([str(ROOT / extra[2]), *extra[3:]])
        assert all(st["fits"] for st in rep["stages"]), (extra, rep["stages"])
    r = subprocess.run(
        [sys.executable, "-m", "ultrafuser.cli", *cmd[1:]],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "per GPU" in r.stdout and "fits" in r.stdout and "s per step" in r.stdout


def test_full_stage2_of_the_paper_trio_is_refused_on_8_gpus_with_the_cheapest_fix():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ultrafuser.cli",
            "plan",
            "configs/recipes/paper-trio/stage2.yaml",
            "--gpus",
            "8",
            "--gpu-memory",
            "80",
            "--sharding",
            "fsdp",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "cheapest fix: LoRA (stage2.trainable=lora)" in r.stderr


def test_train_bench_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run(
        [
            sys.executable,
            "bench/train.py",
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"single", "stage1", "stage2-full", "stage2-full-ckpt", "stage2-lora"}
    for mode, m in res["modes"].items():
        assert "error" not in m, (mode, m)
        assert m["tokens_per_s"] > 0 and m["plan_gib"] > 0
    assert (
        res["modes"]["stage1"]["trainable_params"]
        < res["modes"]["stage2-lora"]["trainable_params"]
        < res["modes"]["stage2-full"]["trainable_params"]
    )
    assert "tok/s" in r.stdout.splitlines()[-10:][0] or "tok/s" in r.stdout


def test_train_bench_fused_master_adamw_matches_the_elementwise_update():
    """bench/train.py's MasterAdamW: the fused kernel and the earlier element-wise passes give the same fp32 master
    weights and bf16 parameters over a few steps (the speed-up is not a different optimizer)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    init = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(x) for x in init] for _ in range(3)]
    runs = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in init]
        opt = bench.MasterAdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(torch.bfloat16)
            opt.step()
        runs.append((opt.master, ps))
    (wf, pf), (wu, pu) = runs
    for a, b, x in zip(wf, wu, init):
        assert (a - x.to(torch.bfloat16).float()).abs().max() > 1e-2  # three steps of lr 1e-2 moved it
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(pf, pu):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
