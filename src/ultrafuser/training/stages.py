"""What trains in each stage: declared, applied and asserted (design.md §3.6).

- stage 1 (`trainable: gate`): the gate's parameters only. The specialists are frozen and run under
  `torch.no_grad()` (see `loop.TrainStep`): no autograd graph is built for them.
- stage 2, `trainable: full`: every parameter of the fused model (gate + every specialist, including
  adapters that specialists already carry and the shared base they sit on).
- stage 2, `trainable: lora`: the gate + one LoRA adapter per specialist. A specialist that already is a
  LoRA adapter on a shared base trains *that* adapter; any other specialist (a dense model, or the bare
  base of a shared group) gets a fresh adapter named after its domain (PEFT; `lora_r`, `lora_alpha`,
  `lora_dropout`, `lora_target_modules`; B starts at zero, so the model is unchanged at the start;
  the initial A is seeded from the run's seed, independently of the global RNG).

`trainable_names` states the exact set of parameter names (as `FusedModel.named_parameters()` spells
them); `prepare_stage` sets `requires_grad` to exactly that set and asserts it.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ultrafuser.config import ConfigError, StageConfig

log = logging.getLogger(__name__)


def adapter_param(name: str, adapter: str) -> bool:
    """Is `name` a parameter of PEFT adapter `adapter` (e.g. '...q_proj.lora_A.code.weight')?"""
    parts = name.split(".")
    return any(p.startswith("lora_") and parts[i + 1] == adapter for i, p in enumerate(parts[:-1]))


def trainable_names(model, stage: int, cfg: StageConfig) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    gate = {n for n in names if n.startswith("gate.")}
    if stage == 1:
        return gate
    if cfg.trainable == "full":
        return set(names)
    adapters = [s.adapter for s in model.specialists]
    if any(a is None for a in adapters):
        raise RuntimeError("trainable=lora: every specialist needs an adapter (call add_lora_adapters first)")
    return gate | {n for n in names if any(adapter_param(n, a) for a in adapters)}


def add_lora_adapters(model, cfg: StageConfig, seed: int) -> list[str]:
    """Give every specialist without an adapter a fresh LoRA adapter named after its domain; return their domains."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    by_model = {id(s.model): s.peft_model for s in model.specialists if s.peft_model is not None}
    added = []
    for k, s in enumerate(model.specialists):
        if s.adapter is not None:
            continue
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 7919 + k + 1)
            pm = by_model.get(id(s.model))
            try:
                if pm is None:
                    by_model[id(s.model)] = get_peft_model(s.model, lcfg, adapter_name=s.domain)
                else:
                    pm.add_adapter(s.domain, lcfg)
            except ValueError as e:
                raise ConfigError(f"stage2 LoRA for specialist {s.domain!r}: {e} (check stage2.lora_target_modules)") from e
        s.adapter = s.domain
        added.append(s.domain)
    for s in model.specialists:
        if id(s.model) in by_model:
            s.peft_model = by_model[id(s.model)]
            s._tuner_layers = [m for m in s.model.modules() if isinstance(m, BaseTunerLayer)]
    return added


def prepare_stage(model, stage: int, cfg: StageConfig, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Set exactly the declared parameters trainable for `stage`; return them (name, parameter) in order."""
    if stage == 1 and model.gate is None:
        raise ConfigError(
            f"stage 1 trains the gate, but this fused model's gate is fixed ({model.config.gate.mode}); "
            "use a learned gate or set stage1.steps=0"
        )
    if stage == 2 and cfg.trainable == "lora":
        added = add_lora_adapters(model, cfg, seed)
        if added:
            log.info("stage 2: fresh LoRA adapters (r=%d) for %s", cfg.lora_r, ", ".join(added))
    want = trainable_names(model, stage, cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n in want)
    got = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == want, f"stage {stage}: trainable parameters differ from the declaration: {sorted(got ^ want)[:5]}"
    with warnings.catch_warnings():  # transformers 5 warns about a deprecated attribute inside .train()
        warnings.simplefilter("ignore", FutureWarning)
        model.train(stage == 2)  # stage 1: specialists in eval mode (the gate has no dropout)
    if stage == 2 and cfg.gradient_checkpointing:
        for m in model.models:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return [(n, p) for n, p in model.named_parameters() if n in want]


def upcast_master_weights(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.dtype]:
    """Make trainable bf16 / fp16 parameters fp32 in place (the master weights; AdamW's moments follow them) and
    return {name: original dtype}. The same mixed precision as Hugging Face Trainer on an fp32-loaded model with
    bf16=True: autocast runs the matmuls in bf16, the weights accumulate updates in fp32."""
    upcast = {}
    for n, p in named:
        if p.dtype in (torch.bfloat16, torch.float16):
            upcast[n] = p.dtype
            p.data = p.data.float()
    return upcast


def restore_dtypes(model, upcast: dict[str, torch.dtype]) -> None:
    """Return upcast master weights to their specialists' dtype (before an export)."""
    params = dict(model.named_parameters())
    for n, dt in upcast.items():
        params[n].data = params[n].data.to(dt)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_stage(stage: int, cfg: StageConfig, model) -> str:
    trainable, total = count_parameters(model)
    what = "the gate only; specialists frozen, run without autograd" if stage == 1 else (
        "the gate and every specialist parameter" if cfg.trainable == "full" else
        "the gate and one LoRA adapter per specialist")
    return (f"stage {stage}: trains {what} — {trainable:,} / {total:,} parameters trainable "
            f"({100.0 * trainable / max(total, 1):.2f}%); {cfg.steps} steps, {cfg.per_domain} per domain per step, "
            f"lr {cfg.lr:g}")
