"""Freezing is declared and asserted: the exact trainable parameter names of each stage."""

import contextlib

import pytest
import torch
from trainkit import make_records

from ultrafuser.config import StageConfig
from ultrafuser.modeling.fused import FusedModel
from ultrafuser.training.loop import TrainStep, token_ce
from ultrafuser.training.stages import prepare_stage

GATE = {"gate.mlp.0.weight", "gate.mlp.0.bias", "gate.mlp.2.weight", "gate.mlp.2.bias"}
ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
S1 = StageConfig(steps=1, per_domain=1, trainable="gate")
FULL = StageConfig(steps=1, per_domain=1, trainable="full")


def lora_names(model_idx: int, adapter: str, modules, layers=2):
    return {f"models.{model_idx}.model.layers.{l}.{m}.lora_{ab}.{adapter}.weight"
            for l in range(layers) for m in modules for ab in "AB"}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def batch_of(model, n=3):
    return model.collate([model.align([m.model_dump() for m in r.messages]) for r in make_records()[:n]])


def test_stage1_trains_exactly_the_gate_and_runs_specialists_without_autograd(fused_dir):
    model = FusedModel.from_pretrained(fused_dir)
    named = prepare_stage(model, 1, S1, seed=0)
    assert {n for n, _ in named} == GATE == trainable(model)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(torch.is_grad_enabled())) for m in model.models]
    z, _ = TrainStep(model, 1, contextlib.nullcontext)(batch_of(model))
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # every specialist forward ran with autograd off
    assert z.requires_grad  # ... and the gate's graph is there
    token_ce(z, batch_of(model).labels).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in GATE)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in GATE)


def test_stage2_full_trains_every_parameter(fused_dir):
    model = FusedModel.from_pretrained(fused_dir)
    prepare_stage(model, 1, S1, seed=0)
    prepare_stage(model, 2, FULL, seed=0)
    everything = {n for n, _ in model.named_parameters()}
    assert trainable(model) == everything
    assert GATE < everything and any(n.startswith("models.2.") for n in everything)


def test_stage2_lora_on_dense_specialists_adds_one_fresh_adapter_each(fused_dir):
    model = FusedModel.from_pretrained(fused_dir)
    b = batch_of(model)
    with torch.no_grad():
        before = model(b).logits
    cfg = StageConfig(steps=1, per_domain=1, trainable="lora", lora_r=4)
    prepare_stage(model, 2, cfg, seed=0)
    want = set(GATE)
    for i, d in enumerate(("text", "code", "math")):
        want |= lora_names(i, d, ATTN + MLP)
    assert trainable(model) == want
    with torch.no_grad():
        after = model(b).logits
    assert torch.equal(before, after)  # fresh adapters start at B = 0: the model is unchanged


def test_stage2_lora_on_a_shared_base_trains_the_existing_adapters(shared_dir):
    model = FusedModel.from_pretrained(shared_dir)
    assert len(model.models) == 1  # one base in memory
    b = batch_of(model)
    with torch.no_grad():
        before = model(b, return_specialist_logits=True).specialist_logits
    cfg = StageConfig(steps=1, per_domain=1, trainable="lora", lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    prepare_stage(model, 2, cfg, seed=0)
    existing = ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"]  # what tests/tinymodels.make_lora targets
    want = GATE | lora_names(0, "code", existing) | lora_names(0, "math", existing) | lora_names(0, "text", existing[:2])
    assert trainable(model) == want
    with torch.no_grad():
        after = model(b, return_specialist_logits=True).specialist_logits
    for x, y in zip(before, after):
        assert torch.equal(x, y)  # each specialist still runs its own adapter (text: its fresh, zero one)
    assert not torch.equal(after[0], after[1])


def test_stage1_refused_for_a_fixed_gate(tiny_dir):
    from ultrafuser.config import ConfigError, FuseConfig, GateConfig, SpecialistConfig

    cfg = FuseConfig(specialists=[SpecialistConfig(domain="text", path=tiny_dir["text"])], gate=GateConfig(mode="uniform"))
    with pytest.raises(ConfigError, match="stage 1 trains the gate"):
        prepare_stage(FusedModel.from_config(cfg), 1, S1, seed=0)
