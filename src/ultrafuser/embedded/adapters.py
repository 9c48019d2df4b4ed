"""The recipe that makes the embedded default's code and math specialists: a seeded PEFT LoRA fine-tune of the
base on one domain's bundled training data, loss on the replies only.

    ultrafuser embedded train-adapter configs/embedded/adapter-math.yaml

It runs through the core's own path: the base is a one-specialist fused model, so inputs are aligned and
the LM head runs only at reply positions (the cheap part of the loss on a 49k vocabulary), exactly as in
fusion training. bf16 base weights, fp32 adapter weights, AdamW, cosine schedule with warm-up.
The adapter is saved in safetensors (bf16, small enough to commit) with a `recipe.json` recording the
command, config, data hash, seed and final loss.

A run takes tens of minutes on a CPU, so it checkpoints every `save_every` steps into `checkpoint_dir`
(default `runs/adapters/DOMAIN/`, git-ignored; the training checkpoints' format: safetensors + JSON,
atomic, verified) and a re-run of the same command resumes from the newest one and ends with the same
adapter as an uninterrupted run. A checkpoint made by a different recipe or data is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

from pydantic import Field

from ultrafuser.config import ConfigError, _Frozen, load_yaml
from ultrafuser.embedded.base import cpu_has_native_bf16

log = logging.getLogger(__name__)


class AdapterRecipe(_Frozen):
    domain: str
    base: str = "embedded:smollm2-135m-instruct"
    train: list[str]
    out: str
    seed: int = 0
    steps: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(4e-4, gt=0)
    warmup_steps: int = Field(4, ge=0)
    max_length: int = Field(256, ge=16)
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = 16.0
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dtype: str = "auto"  # bf16 where the CPU computes it natively, else fp32 (emulated bf16 is ~3x slower)
    threads: int | None = None
    save_every: int = Field(20, ge=1)
    keep_last: int = Field(2, ge=1)
    checkpoint_dir: str | None = None  # default runs/adapters/DOMAIN


def _read_jsonl(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"training data {p!r} does not exist (bundled data lives in data/embedded/)")
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def train_adapter(recipe: AdapterRecipe, config_path: str | None = None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
    from ultrafuser.modeling.fused import FusedModel
    from ultrafuser.training.checkpoint import (
        find_checkpoint,
        list_checkpoints,
        load_optimizer,
        optimizer_files,
        save_checkpoint,
    )
    from ultrafuser.training.faults import fault

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    dtype = recipe.dtype if recipe.dtype != "auto" else ("bfloat16" if cpu_has_native_bf16() else "float32")
    rows = [r for r in _read_jsonl(recipe.train) if r["domain"] == recipe.domain]
    if not rows:
        raise ConfigError(f"no records with domain {recipe.domain!r} in {recipe.train}")
    data_hash = hashlib.sha256("".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = FusedModel.from_config(FuseConfig(
        specialists=[SpecialistConfig(domain=recipe.domain, path=recipe.base, dtype=dtype)],
        gate=GateConfig(mode="uniform")))
    spec = model.specialists[0]
    peft_model = get_peft_model(spec.model, LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=recipe.lora_target_modules,
        lora_dropout=0.0, task_type="CAUSAL_LM"))
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter weights on a bf16 base
    spec.model = peft_model.get_base_model()  # LoRA layers are injected in place; same forward path
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    log.info("trainable parameters: %d of %d", sum(p.numel() for p in trainable),
             sum(p.numel() for p in peft_model.parameters()))

    examples = []
    too_long = 0
    for r in rows:
        ex = model.align(r["messages"])
        if max(ex.lengths) > recipe.max_length:
            too_long += 1
            continue
        examples.append(ex)
    if too_long:
        log.info("skipped %d examples longer than max_length=%d (never cut mid-reply)", too_long, recipe.max_length)
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, recipe.warmup_steps, recipe.steps)
    order: list[int] = []
    rng = random.Random(recipe.seed)
    losses: list[float] = []
    names = {id(p): n for n, p in peft_model.named_parameters() if p.requires_grad}
    ckpt_root = Path(recipe.checkpoint_dir or f"runs/adapters/{recipe.domain}")
    fingerprint = hashlib.sha256((recipe.model_dump_json(exclude={"threads", "save_every", "keep_last",
                                                                   "checkpoint_dir"}) + data_hash).encode()).hexdigest()
    start, seconds_before = 0, 0.0
    if list_checkpoints(ckpt_root):
        ck = find_checkpoint(ckpt_root)
        st = ck.json("state.json")
        if st["fingerprint"] != fingerprint:
            raise ConfigError(f"{ck.path} was made by another recipe or other data; delete {ckpt_root} to start "
                              "afresh, or set checkpoint_dir to another folder")
        params = ck.tensors("adapter.safetensors")
        with torch.no_grad():
            for p in trainable:
                p.copy_(params[names[id(p)]])
        ot, oj = ck.tensors("optimizer.safetensors"), ck.json("optimizer.json")
        load_optimizer(opt, names, ot, oj)
        sched.load_state_dict(st["scheduler"])
        start, order, losses, seconds_before = st["step"], st["order"], st["losses"], st["seconds"]
        v, state, g = st["rng"]
        rng.setstate((v, tuple(state), g))
        torch.set_rng_state(ck.tensors("rng.safetensors")["torch_cpu"])
        log.info("resuming the %s adapter at step %d from %s", recipe.domain, start, ck.path)
    spec.model.train()
    bar = tqdm(range(start, recipe.steps), desc=f"{recipe.domain} adapter", unit="step", initial=start,
               total=recipe.steps)
    t0, tokens = time.time() - seconds_before, 0
    for step in bar:
        if len(order) < recipe.batch_size:  # walk the data in seeded order without repeats, then reshuffle
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
        batch = model.collate([examples[i] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        tokens += int((batch.labels != -100).sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        done = step + 1
        if done % recipe.save_every == 0 and done < recipe.steps:
            ot, oj = optimizer_files(opt, names)
            v, state, g = rng.getstate()
            save_checkpoint(ckpt_root, done, {
                "adapter.safetensors": {names[id(p)]: p.detach() for p in trainable},
                "optimizer.safetensors": ot, "optimizer.json": oj,
                "rng.safetensors": {"torch_cpu": torch.get_rng_state()},
                "state.json": {"fingerprint": fingerprint, "step": done, "order": order, "losses": losses,
                               "seconds": time.time() - t0, "scheduler": sched.state_dict(),
                               "rng": [v, list(state), g]},
            }, recipe.keep_last)
            fault("adapter_saved", done)  # tests: a crash right after a checkpoint
    out_dir = Path(recipe.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in trainable:
        p.data = p.data.to(torch.bfloat16)  # committed adapters are small: bf16
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    info = {
        "command": "ultrafuser embedded train-adapter " + (config_path or "(in-memory recipe)"),
        "recipe": json.loads(recipe.model_dump_json()),
        "data_sha256": data_hash,
        "examples": len(examples),
        "skipped_too_long": too_long,
        "first_loss": losses[0],
        "final_loss_mean_last5": sum(losses[-5:]) / len(losses[-5:]),
        "seconds": round(time.time() - t0, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    (out_dir / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    scrub_adapter_dir(out_dir, recipe.base)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the adapter is written: its checkpoints have done their job
    return info


def scrub_adapter_dir(out_dir: Path, base: str) -> None:
    """PEFT records the base's local path (a cache folder of this machine) in adapter_config.json and a model
    card; the committed adapter names the base portably (`embedded:…`) and carries no machine path."""
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card = out_dir / "README.md"
    if card.is_file():
        card.unlink()


def run(args) -> int:
    recipe = load_yaml(args.config, AdapterRecipe, args.overrides)
    print(json.dumps(train_adapter(recipe, args.config), indent=2))
    return 0
