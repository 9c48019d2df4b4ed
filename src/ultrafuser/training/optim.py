"""Optimiser, learning-rate schedule and precision for one stage.

AdamW (paper §2.1) with weight decay on matrices only (biases and norms are not decayed); a cosine
schedule with linear warm-up from transformers (`get_cosine_with_min_lr_schedule_with_warmup`: warm-up
`warmup_steps`, then cosine down to `min_lr_ratio * lr` at the stage's last step). Each stage has its own
optimizer and schedule; stage 2 starts with fresh AdamW moments.

Precision: `fp32`, `bf16` (autocast; weights and optimizer state stay in their own dtype, the fused
logits and the loss are fp32), or `auto`: bf16 on CUDA devices that support it and on CPUs with
AVX512-BF16 or AMX, fp32 elsewhere. CPU runs are deterministic in both; the exact-resume tests use fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ultrafuser.config import StageConfig


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: StageConfig) -> torch.optim.AdamW:
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # CUDA: PyTorch's fused AdamW (one kernel over weights, gradients and moments; Hugging Face Trainer's default
    # `adamw_torch_fused`). Elsewhere foreach=False: one kernel per tensor, the same arithmetic whatever the
    # parameter count (the exact-resume tests run on the CPU).
    fused = bool(named) and all(p.is_cuda for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **({"fused": True} if fused else
                                                                          {"foreach": False}))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: StageConfig):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(cfg.steps, 1),
        min_lr_rate=cfg.min_lr_ratio,
    )


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if _cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
