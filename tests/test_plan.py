"""`ultrafuser plan`: parameter counts, the memory arithmetic, the fit verdict and the cheapest fix."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ultrafuser.config import ConfigError
from ultrafuser.plan import (
    KNOWN_ARCHITECTURES,
    Arch,
    Setting,
    SpecInfo,
    cheapest_fix,
    estimate,
    report,
    resolve_arch,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = [
    "openbmb/UltraLM-13b-v2.0",
    "codellama/CodeLlama-13b-Instruct-hf",
    "WizardLMTeam/WizardMath-13B-V1.0",
]


def run_plan(*args, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "ultrafuser.cli", "plan", *map(str, args)],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )


def train_yaml(tmp_path, specialists, stage2=None, max_length=2048, name="run.yaml", **extra):
    tree = {
        "model": {"specialists": specialists},
        "data": {"train": ["x.jsonl"], "max_length": max_length},
        "output_dir": str(tmp_path / "out"),
        "precision": "bf16",
        "stage1": {"steps": 400, "per_domain": 64, "micro_batch": 8},
        "stage2": stage2 or {"steps": 0, "per_domain": 32, "trainable": "full"},
        **extra,
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree))
    return p


def paper_specs(dtype="bfloat16"):
    return [{"domain": d, "path": p, "dtype": dtype} for d, p in zip(("text", "code", "math"), PAPER)]


# ----------------------------------------------------------------------------------------------- parameters


def tiny_model_dir(path: Path, seed: int = 0, layers: int = 2) -> str:
    """A tiny random Llama saved like a downloaded model (config.json + safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_param_count_from_local_config_equals_the_real_models_numel(tmp_path):
    from transformers import AutoModelForCausalLM

    arch, src = resolve_arch(tiny_model_dir(tmp_path / "m"))
    assert src.startswith("local")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert arch.params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama-tied", "llama-bias", "mistral"])
def test_param_count_matches_hf_for_other_layouts(tmp_path, kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    extra = {
        "qwen3": {"head_dim": 16},
        "llama-tied": {"tie_word_embeddings": True},
        "llama-bias": {"attention_bias": True, "mlp_bias": True},
    }.get(kind, {})
    cfg = AutoConfig.for_model(kind.split("-")[0], **base, **extra)
    cfg.save_pretrained(tmp_path)
    arch = Arch.from_config_dict(json.loads((tmp_path / "config.json").read_text()), "t")
    assert arch.params() == sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


def test_builtin_table_matches_published_sizes():
    # Llama-2-7B 6.74 B, Llama-2-13B 13.02 B, Qwen2.5-7B 7.62 B, SmolLM2-135M 134.5 M (their model cards)
    assert KNOWN_ARCHITECTURES["meta-llama/Llama-2-7b-hf"].params() == 6_738_415_616
    assert KNOWN_ARCHITECTURES["meta-llama/Llama-2-13b-hf"].params() == 13_015_864_320
    assert KNOWN_ARCHITECTURES["Qwen/Qwen2.5-7B-Instruct"].params() == 7_615_616_512
    assert KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M-Instruct"].params() == 134_515_008
    # CodeLlama's 16 extra rows in both the embedding and the LM head
    assert KNOWN_ARCHITECTURES[PAPER[1]].params() - KNOWN_ARCHITECTURES[PAPER[0]].params() == 2 * 16 * 5120
    assert [KNOWN_ARCHITECTURES[p].vocab_size for p in PAPER] == [32000, 32016, 32001]
    assert KNOWN_ARCHITECTURES["Qwen/Qwen2.5-Math-7B-Instruct"].max_positions == 4096


def test_unknown_model_not_local_is_a_clear_error():
    with pytest.raises(ConfigError, match="huggingface-cli download acme/unknown-7b config.json"):
        resolve_arch("acme/unknown-7b")


def test_hub_id_found_in_the_hf_cache(tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--cached-1b" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(
        json.dumps(
            dict(
                model_type="llama",
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                vocab_size=100,
            )
        )
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    arch, src = resolve_arch("acme/cached-1b")
    assert src == "Hugging Face cache" and arch.num_layers == 3


# ----------------------------------------------------------------------------------------------- arithmetic


TINY = Arch(
    hidden_size=64,
    intermediate_size=160,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    vocab_size=100,
    max_positions=512,
)


def test_arithmetic_by_hand_full_stage2():
    # P: embed 6400 + head 6400 + norm 64 + 2 layers x (4 x 64^2 + 3 x 64 x 160 + 2 x 64 = 47232) = 107328
    assert TINY.params() == 107_328
    specs = [SpecInfo(d, d, TINY, d) for d in ("a", "b")]
    s = Setting(
        stage=2,
        trainable="full",
        micro_batch=2,
        per_domain=2,
        n_domains=1,
        max_length=16,
        avg_tokens=16,
        peak_tflops=100.0,
        mfu=0.5,
        headroom=0.0,
        gpu_memory_gib=1.0,
    )
    e = estimate(specs, s)
    P = 2 * 107_328
    assert e.memory["weights"] == 2 * P and e.memory["gradients"] == 2 * P and e.memory["optimizer"] == 12 * P
    T = 2 * 16  # micro-batch x max_length
    # per layer and token: 2 norms (4h fp32 + 2h) + linear inputs 2(h + h + h + I) + attention 2(2h + 2h) + MLP 3 x 2I
    per_layer = 2 * (4 * 64 + 2 * 64) + 2 * (3 * 64 + 160) + 2 * (4 * 64) + 6 * 160
    assert per_layer == 26 * 64 + 8 * 160
    final = 4 * 64 + 2 * 64
    assert e.memory["activations"] == 2 * T * (2 * per_layer + final)
    # fused head per target: bf16 logits 2 x 2V + N = 2 fp32 copies 8V + 12V while summing = 24V; backward of the
    # log-softmax 8V + 16V = 24V; + the gate's fp32 inputs and ReLU outputs
    gate = 64 * 512 + 2 * 512 + 1
    head = T * (24 * 100 + 2 * (4 * 64 + 4 * 512))
    assert e.memory["fused head + working set"] == head
    assert e.memory["trainable (gate, LoRA)"] == 16 * gate
    assert e.total == sum(e.memory.values())
    # time: 6 x (P without the input embeddings) x tokens per step + gate, over GPUs x peak x MFU
    flops = 6 * 2 * (107_328 - 6400) * 32 + 6 * gate * 2 * 32
    assert e.flops_per_step == flops and e.seconds_per_step == pytest.approx(flops / (100e12 * 0.5))
    assert e.tokens_per_step_max == e.tokens_per_step_avg == 32 and e.accumulation == 1


def test_stage1_keeps_no_activations_and_sharding_divides_the_states():
    specs = [SpecInfo("a", "a", TINY, "a")]
    one = estimate(
        specs, Setting(stage=1, trainable="gate", micro_batch=4, per_domain=8, n_domains=1, max_length=16)
    )
    assert one.memory["activations"] == 0 and one.memory["gradients"] == 0 and one.memory["optimizer"] == 0
    assert one.accumulation == 2 and one.micro_batch == 4
    full = Setting(stage=2, trainable="full", micro_batch=1, per_domain=8, n_domains=1, max_length=16)
    a, b = estimate(specs, full), estimate(specs, dataclasses.replace(full, gpus=4, sharding="fsdp"))
    assert (
        b.memory["optimizer"] == a.memory["optimizer"] / 4 and b.memory["weights"] == a.memory["weights"] / 4
    )
    assert b.memory["sharding buffers"] > 0 == a.memory["sharding buffers"]
    ckpt = estimate(specs, dataclasses.replace(full, checkpointing=True))
    assert ckpt.memory["activations"] < a.memory["activations"]
    no_gate = dataclasses.replace(
        full, gate_mode="uniform"
    )  # the recomputed forward: 8 N instead of 6 N per token
    assert (
        estimate(specs, dataclasses.replace(no_gate, checkpointing=True)).flops_per_step
        == estimate(specs, no_gate).flops_per_step * 8 / 6
    )


def test_shared_lora_base_is_counted_once():
    specs = [SpecInfo(d, "base", TINY, "base-key") for d in ("a", "b", "c")]
    e = estimate(
        specs, Setting(stage=1, trainable="gate", micro_batch=1, per_domain=1, n_domains=3, max_length=8)
    )
    assert e.memory["weights"] == 2 * TINY.params()


def test_cheapest_fix_prefers_one_change_that_fits():
    a = KNOWN_ARCHITECTURES["Qwen/Qwen2.5-7B-Instruct"]
    specs = [SpecInfo(d, d, a, d) for d in ("text", "code", "math")]
    s = Setting(
        stage=2, trainable="full", sharding="fsdp", gpus=8, micro_batch=1, per_domain=32, max_length=4096
    )
    assert not estimate(specs, s).fits  # no checkpointing: 28 layers of activations per specialist
    change, fixed = cheapest_fix(specs, s)
    assert change.startswith("activation checkpointing") and fixed.gpus == 8 and estimate(specs, fixed).fits
    s2 = dataclasses.replace(s, checkpointing=True, micro_batch=4)
    change, fixed = cheapest_fix(specs, s2)
    assert change == "micro_batch=1" and estimate(specs, fixed).fits


# ----------------------------------------------------------------------------------------------- the command


def test_refuses_full_stage2_of_three_13b_on_one_80gb_gpu(tmp_path):
    cfg = train_yaml(tmp_path, paper_specs(), stage2={"steps": 100, "per_domain": 32, "trainable": "full"})
    r = run_plan(cfg, "--stage", "2", "--gpus", "1", "--gpu-memory", "80")
    assert r.returncode == 2, r.stderr
    assert "does NOT fit" in r.stdout
    # LoRA alone leaves 78 GB of frozen 13B weights on an 80 GB card: the cheapest fit also shards over 2 GPUs
    # (with checkpointing and a micro-batch that fits there)
    assert (
        "cheapest fix: LoRA (stage2.trainable=lora) + activation checkpointing "
        "(stage2.gradient_checkpointing=true) + micro_batch=7 + 2 GPUs with fsdp"
    ) in r.stderr
    rep = report([str(cfg), "--stage", "2"])
    assert rep["stages"][0]["fix"]["gpus"] == 2 and rep["stages"][0]["fix"]["total_gib"] <= 72.0


def test_json_report_and_a_fitting_run_exits_0(tmp_path):
    cfg = train_yaml(tmp_path, paper_specs())
    r = run_plan(cfg, "--gpus", "8", "--sharding", "zero3", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["fused"] == {
        "vocab": 32000,
        "vocab_rows": [32000, 32016, 32001],
        "context": 4096,
        "max_length": 2048,
        "domains": 3,
    }
    (st,) = rep["stages"]
    assert st["stage"] == 1 and st["fits"] and st["micro_batch"] == 24 and st["accumulation"] == 1
    assert "stage1.micro_batch=24" in rep["notes"][0]  # ZeRO-3: a GPU's share of a step is one micro-batch
    assert st["tokens_per_step"]["max"] == 192 * 2048 and st["memory_gib"]["activations"] == 0


def test_float32_specialists_cost_twice_the_weights(tmp_path):
    a = report([str(train_yaml(tmp_path, paper_specs("float32"))), "--gpus", "8"])
    b = report([str(train_yaml(tmp_path, paper_specs(), name="b.yaml")), "--gpus", "8"])
    assert a["stages"][0]["memory_gib"]["weights"] == pytest.approx(
        2 * b["stages"][0]["memory_gib"]["weights"], 0.01
    )
    assert "dtype: bfloat16" in a["specialists"][0]["source"]


def test_max_length_beyond_the_fused_context_is_refused(tmp_path):
    qwen = [
        {"domain": d, "path": f"Qwen/Qwen2.5-{m}7B-Instruct"} for d, m in (("text", ""), ("math", "Math-"))
    ]
    r = run_plan(train_yaml(tmp_path, qwen, max_length=8192), "--gpus", "8")
    assert r.returncode == 2 and "exceeds the fused context 4096" in r.stderr and "Qwen2.5-Math" in r.stderr


def test_unknown_specialist_exits_2_naming_the_fix(tmp_path):
    r = run_plan(
        train_yaml(tmp_path, [{"domain": "x", "path": "acme/nope-3b"}]), env={"HF_HUB_CACHE": str(tmp_path)}
    )
    assert r.returncode == 2 and "huggingface-cli download acme/nope-3b" in r.stderr


def test_local_specialists_and_a_stage2_yaml_that_reads_stage1_output(tmp_path):
    specs = [
        {"domain": d, "path": tiny_model_dir(tmp_path / d, k, layers=k + 1)}
        for k, d in enumerate(("text", "code", "math"))
    ]
    s1 = train_yaml(tmp_path, specs, name="stage1.yaml")
    tree = yaml.safe_load(s1.read_text())
    tree.update(
        model=tree["output_dir"],
        output_dir=str(tmp_path / "out2"),
        stage1={"steps": 0, "per_domain": 64},
        stage2={"steps": 10, "per_domain": 32, "trainable": "lora"},
    )
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(tree))
    rep = report([str(tmp_path / "stage2.yaml")])
    assert "stage1.yaml" in rep["model_from"] and rep["stages"][0]["trainable"] == "lora"
    assert all(sp["source"].startswith("local") for sp in rep["specialists"])
    assert [sp["layers"] for sp in rep["specialists"]] == [1, 2, 3]
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "stage2.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="--model"):
        report([str(tmp_path / "alone" / "stage2.yaml")])
    rep3 = report([str(tmp_path / "alone" / "stage2.yaml"), "--model", str(s1)])
    assert rep3["specialists"][0]["params"] == rep["specialists"][0]["params"]


def test_zero3_runs_a_gpus_share_as_one_micro_batch_and_fsdp_is_its_fix():
    a = KNOWN_ARCHITECTURES["Qwen/Qwen2.5-7B-Instruct"]
    specs = [SpecInfo(d, d, a, d) for d in ("text", "code", "math")]
    s = Setting(
        stage=1, trainable="gate", sharding="zero3", gpus=8, micro_batch=2, per_domain=64, max_length=4096
    )
    e = estimate(specs, s)
    assert (e.micro_batch, e.accumulation) == (24, 1) and not e.fits
    change, fixed = cheapest_fix(specs, s)
    assert change.startswith("micro_batch=2 with fsdp") and fixed.sharding == "fsdp" and fixed.gpus == 8


def test_optimizer_layouts():
    specs = [SpecInfo("a", "a", TINY, "a")]
    s = Setting(stage=2, trainable="full", micro_batch=1, per_domain=1, n_domains=1, max_length=8)
    P = TINY.params()
    byopt = {
        o: estimate(specs, dataclasses.replace(s, optimizer=o)).memory["optimizer"]
        for o in ("adamw", "adamw-8bit", "adamw-param-dtype")
    }
    assert byopt == {"adamw": 12 * P, "adamw-8bit": 6 * P, "adamw-param-dtype": 4 * P}
    fp32 = [SpecInfo("a", "a", TINY, "a", weight_bytes=4)]
    assert estimate(fp32, s).memory["optimizer"] == 8 * P  # fp32 weights are their own master copy
