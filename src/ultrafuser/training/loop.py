"""The training run, top to bottom: `run(config)` → stage 1 (gate) → stage 2 (gate + specialists) → fused dir.

One optimizer step (paper §2.1, Algorithm 1):

1. the balanced sampler picks exactly `per_domain` examples of every domain (global count; with P processes
   each takes n / P of every domain);
2. this process's share is cut into micro-batches of `micro_batch` examples; each is run forward
   (stage 1: specialists under `torch.no_grad()`, or from the hidden-state cache) and backward, gradients
   accumulate;
3. the loss is the cross-entropy of the fused distribution softmax(z) on reply tokens only, **token mean
   over the whole step** (all micro-batches and all processes): each micro-batch contributes
   sum(token CE) / (reply tokens in the step), so accumulation and the process split never change it.
   This is `fused_loss` (= `FusedOutput.loss`) taken over the step instead of the micro-batch. (The
   paper's Algorithm 1 averages per-example sums; the token mean differs from it by a per-step factor,
   tokens / examples, and does not let long replies dominate a step.);
4. gradients are checked (non-finite stops the run naming step, stage, examples), clipped, and AdamW +
   cosine schedule take a step;
5. one log line, one metrics.jsonl line; a checkpoint every `save_every` steps, at the end of each stage,
   and when SIGTERM asked to stop.

Exit codes: 0 done; 2 config / data / checkpoint error (raised as ConfigError, reported by the CLI);
`EXIT_NONFINITE` (3) NaN/inf loss or gradient; `EXIT_INTERRUPTED` (75, EX_TEMPFAIL: "try again") stopped by
SIGTERM after saving a checkpoint — `--resume` continues exactly.

Multi-process: the same entry point under `accelerate launch` / `torchrun` (see configs/accelerate/). The
model is wrapped per stage (DDP on CPU/gloo and GPU/nccl) after its trainable set is fixed; every process
loads and aligns all the data and runs the same sampler; only the main process writes files.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ultrafuser.config import ConfigError, StageConfig, TrainConfig
from ultrafuser.data.conversation import IGNORE_INDEX
from ultrafuser.data.loading import TrainingData, load_training_data
from ultrafuser.data.sampler import BalancedSampler, check_split, plan_micro_batches
from ultrafuser.training import checkpoint as ckpt
from ultrafuser.training.cache import HiddenCache
from ultrafuser.training.export import _abs_ref, export_fused
from ultrafuser.training.faults import StopFlag, fault
from ultrafuser.training.metrics import Metrics
from ultrafuser.training.optim import autocast, build_optimizer, build_schedule, resolve_precision
from ultrafuser.training.stages import describe_stage, prepare_stage, restore_dtypes, upcast_master_weights

log = logging.getLogger("ultrafuser.training")

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75


class TrainStep(torch.nn.Module):
    """What one process computes for a micro-batch: fused logits z (B, J, V) and gate weights w (B, J, N).

    A module (so DDP / FSDP can wrap it) holding the fused model. Stage 1 runs the specialists under
    `torch.no_grad()`: only the gate builds an autograd graph.
    """

    def __init__(self, model, stage: int, amp, cache: HiddenCache | None = None):
        super().__init__()
        self.model = model
        self.stage = stage
        self.amp = amp
        self.cache = cache

    def forward(self, batch, hiddens=None):
        m = self.model
        batch = batch.to([s.device for s in m.specialists])
        with self.amp():
            if hiddens is not None:  # stage 1, cached hidden states: logits through each LM head
                with torch.no_grad():
                    logits = self.cache.logits(hiddens)  # N × (B, J, V_k)
            elif self.stage == 1:
                with torch.no_grad():
                    hiddens, logits = m.run_specialists(batch)  # N × (B, J, H_k), N × (B, J, V_k)
            else:
                hiddens, logits = m.run_specialists(batch)
            z, w = m.mix(hiddens, logits)  # (B, J, V) fp32, (B, J, N)
        return z, w


def token_ce(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of softmax(z) (B, J); 0 where the label is ignored. `fused_loss` = its token mean."""
    B, J, V = z.shape
    return F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none").view(B, J)


@dataclass
class RunState:
    step: int = 0  # optimizer steps done, over both stages
    stage: int = 1
    stage_step: int = 0  # optimizer steps done in `stage`


# --------------------------------------------------------------------------------------------- setup


def make_accelerator():
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise ConfigError(
            f"launched as {launched} processes but accelerate sees {acc.num_processes}; every process would train "
            "alone. Launch with `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`"
        )
    return acc


def load_model(ref, acc=None):
    """The fused model of a run (a fused directory or an inline FuseConfig), on the accelerator's device when the
    config leaves every specialist on the CPU and the process has a GPU."""
    from ultrafuser.modeling.fused import FusedModel

    if isinstance(ref, str):
        model, base_dir = FusedModel.from_pretrained(ref), ref
    else:
        model, base_dir = FusedModel.from_config(ref), None
    if acc is not None and acc.device.type != "cpu" and all(s.device.type == "cpu" for s in model.specialists):
        model.to(acc.device)
    return model, base_dir


def model_fingerprint(model, base_dir) -> str:
    """sha256 over the fused config, the gate's checksum and each specialist's config + weight file sizes."""
    h = hashlib.sha256(model.config.model_dump_json().encode())
    if base_dir is not None:
        meta = json.loads((Path(base_dir) / "ultrafuser.json").read_text())
        h.update(str(meta.get("gate_sha256")).encode())
    for s in model.specialists:
        for ref in (s.config.path, s.config.adapter):
            p = _abs_ref(ref, base_dir)
            if p is None:
                continue
            h.update(p.encode())
            d = Path(p)
            if d.is_dir():
                for f in sorted(d.iterdir()):
                    if f.suffix == ".safetensors":
                        h.update(f"{f.name}:{f.stat().st_size}".encode())
                    elif f.name in ("config.json", "adapter_config.json"):
                        h.update(f.read_bytes())
    return h.hexdigest()


def run_fingerprint(cfg: TrainConfig, model_fp: str, data: TrainingData, precision: str) -> dict:
    """What a resumed run must share with the checkpoint (logging and saving options may change)."""
    return {
        "model": model_fp,
        "data_hash": data.hash,
        "data": cfg.data.model_dump(mode="json", exclude={"train"}),
        "stage1": cfg.stage1.model_dump(mode="json"),
        "stage2": cfg.stage2.model_dump(mode="json"),
        "seed": cfg.seed,
        "precision": precision,
    }


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_fingerprint(saved: dict, now: dict, force: bool) -> None:
    a, b = _flat(saved), _flat(now)
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diffs:
        return
    names = {"model": "the fused model or its specialists changed", "data_hash": "the training data changed"}
    lines = [names.get(d.split(":")[0], d) for d in diffs]
    msg = "the checkpoint was made by a different run:\n  " + "\n  ".join(lines)
    if not force:
        raise ckpt.CheckpointError(msg + "\nRefusing to resume; pass --force to resume anyway (not exact), or use a new output_dir.")
    log.warning("%s\n--force: resuming anyway; the run is no longer an exact continuation", msg)


def save_resolved_config(cfg: TrainConfig, out: Path) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".config.yaml.tmp"
    tmp.write_text("# resolved config of this run (ultrafuser train); rerun: ultrafuser train THIS_FILE --resume\n"
                   + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, out / "config.yaml")


# --------------------------------------------------------------------------------------------- run


def run(cfg: TrainConfig, *, resume: bool = False, resume_from: str | None = None, force: bool = False) -> int:
    """Train `cfg` (or continue it: `resume` from the newest checkpoint, `resume_from` a given one); return the exit code."""
    with StopFlag() as stop:  # from here on SIGTERM only sets a flag
        return _run(cfg, resume, resume_from, force, stop)


def _run(cfg: TrainConfig, resume: bool, resume_from: str | None, force: bool, stop: StopFlag) -> int:
    acc = make_accelerator()
    out = Path(cfg.output_dir)
    root = out / "checkpoints"
    main = acc.is_main_process
    start = ckpt.find_checkpoint(root, resume_from or "latest") if (resume or resume_from) else None
    if start is None and ckpt.list_checkpoints(root):
        raise ConfigError(f"{str(out)!r} already holds checkpoints; pass --resume to continue that run, or use a new output_dir")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model, base_dir = load_model(cfg.model, acc)
    precision = resolve_precision(cfg.precision, model.specialists[0].device)
    data = load_training_data(cfg.data, model.align, model.domains, model.context_length)
    sampler = BalancedSampler(data.sizes, cfg.seed)
    stages = [(k, s) for k, s in ((1, cfg.stage1), (2, cfg.stage2)) if s.steps > 0]
    if is_sharded(acc) and len(stages) > 1:
        raise ConfigError(
            "under FSDP / DeepSpeed run the two stages as two runs (the model is sharded once per run, and stage 2 "
            "trains other parameters): first stage2.steps=0, then stage1.steps=0 model=OUTPUT_DIR/stage1"
        )
    for k, s in stages:
        sampler.check(s.per_domain, f"stage{k}.per_domain")
        check_split(s.per_domain, len(data.domains), acc.num_processes, f"stage{k}.per_domain")
    fp = run_fingerprint(cfg, model_fingerprint(model, base_dir), data, precision)
    state = RunState(stage=stages[0][0] if stages else 1)
    if start is not None:
        ts = start.json("trainer_state.json")
        check_fingerprint(ts["fingerprint"], fp, force)
        sampler.load_state_dict(ts["sampler"])
        state = RunState(step=ts["step"], stage=ts["stage"], stage_step=ts["stage_step"])
    start_stage = state.stage if start is not None else None
    if main:
        save_resolved_config(cfg, out)
        (out / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=1) + "\n")
    total = sum(s.steps for _, s in stages)
    metrics = Metrics(out, main, total, state.step, cfg.tensorboard, cfg.log_every, model.domains)
    metrics.say(data.report.summary())
    metrics.say(f"precision {precision}; {acc.num_processes} process(es) on {acc.device}; "
                + (f"resuming from {start.path} (step {state.step}, stage {state.stage})" if start else "fresh start"))
    try:
        for k, scfg in stages:
            if k < state.stage:
                continue
            if k > state.stage:
                state.stage, state.stage_step = k, 0
            code = train_stage(cfg, k, scfg, model, data, sampler, state, acc, precision, fp, stop, metrics,
                               start if start is not None and start_stage == k else None, base_dir)
            if code != EXIT_OK:
                return code
        if not is_sharded(acc):  # (sharded runs export at the end of their one stage, from gathered weights)
            if main:
                trained = cfg.stage2.trainable if cfg.stage2.steps > 0 else None
                export_fused(model, out / "final", base_dir=base_dir, trained=trained,
                             extra={"training": {"output_dir": str(out), "steps": state.step}})
            acc.wait_for_everyone()
        metrics.say(f"done: {state.step} steps; fused model written to {out / 'final'}")
        return EXIT_OK
    except ckpt.NonFiniteError as e:
        log.error("%s. Stopped; the last checkpoint is unaffected (checkpoints never hold non-finite values).", e)
        return EXIT_NONFINITE
    finally:
        metrics.close()


def train_stage(cfg, k: int, scfg: StageConfig, model, data, sampler, state: RunState, acc, precision, fp,
                stop, metrics, start, base_dir) -> int:
    rank, world = acc.process_index, acc.num_processes
    amp = lambda: autocast(precision, model.specialists[0].device)
    named = prepare_stage(model, k, scfg, cfg.seed)
    metrics.say(describe_stage(k, scfg, model))
    sharded = is_sharded(acc)
    upcast = upcast_master_weights(named) if (k == 2 and scfg.master_weights and not sharded) else {}
    if upcast:
        dts = sorted({str(d).removeprefix("torch.") for d in upcast.values()})
        metrics.say(f"stage 2: fp32 master weights for {len(upcast)} {'/'.join(dts)} parameter tensors (autocast "
                    f"computes in {precision}; they return to {'/'.join(dts)} on export; stage2.master_weights=false "
                    "trains them in their own dtype)")
    if start is not None:
        load_weights(start, named)  # before wrapping: DDP broadcasts them, FSDP / ZeRO-3 shard them
    cache = None
    if k == 1 and scfg.cache_hidden_states:
        cache = make_cache(model, data, sampler, scfg, state, rank, world, amp, metrics)
    step_module = TrainStep(model, k, amp, cache)
    if sharded:
        check_sharded(acc, scfg, len(data.domains))
    wrapped, optimizer = wrap(acc, step_module, build_optimizer(named, scfg))
    if sharded:  # the engines replace the parameter objects
        named = [(clean_name(n), p) for n, p in wrapped.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in named}
    params = [p for _, p in named]
    scheduler = build_schedule(optimizer, scfg)
    if start is not None:
        load_states(start, optimizer, scheduler, names, sharded, metrics)
    last_saved = state.step if start is not None else -1
    if k == 2:
        fault("stage2_start")
    domains = data.domains
    D, N = len(domains), len(model.specialists)

    while state.stage_step < scfg.steps:
        t0 = time.perf_counter()
        step_no = state.step + 1
        sample = sampler.next_step(scfg.per_domain)
        micro = plan_micro_batches(sample, rank, world, scfg.micro_batch)
        step_tokens = sum(data.examples[d][i].n_targets for d, idx in sample.indices.items() for i in idx)
        # stats: CE sum per domain, reply tokens per domain, gate weight sums per (domain, specialist), seq tokens, stop
        stats = torch.zeros(D * (2 + N) + 2, dtype=torch.float64)
        for j, items in enumerate(micro):
            exs = [data.examples[d][i] for d, i in items]
            batch = model.collate([e.aligned() for e in exs])
            sync = contextlib.nullcontext() if (world == 1 or j == len(micro) - 1) else acc.no_sync(wrapped)
            with sync:
                hiddens = cache.hiddens(items, exs) if cache is not None else None
                z, w = wrapped(batch, hiddens)  # (B, J, V), (B, J, N)
                labels = batch.labels.to(z.device)  # (B, J)
                ce = token_ce(z, labels)  # (B, J)
                if j == 0 and fault("loss", step_no) == "nan":
                    ce = ce * float("nan")
                row_ce = ce.sum(dim=1)  # (B,)
                _check_loss(row_ce, exs, step_no, k, acc)
                acc.backward(row_ce.sum() * (world / step_tokens))
            mask = (labels != IGNORE_INDEX).to(w.dtype)  # (B, J)
            dom = torch.tensor([domains.index(d) for d, _ in items])
            stats[:D].index_add_(0, dom, row_ce.detach().double().cpu())
            stats[D : 2 * D].index_add_(0, dom, mask.sum(1).double().cpu())
            wsum = (w.detach() * mask.unsqueeze(-1)).sum(1).double().cpu()  # (B, N)
            stats[2 * D : 2 * D + D * N].view(D, N).index_add_(0, dom, wsum)
            stats[-2] += sum(e.seq_tokens for e in exs)
            del z, w, ce  # free this micro-batch's logits before the next forward
            if j == 0:
                fault("accum", step_no)
        if fault("grad", step_no) == "nan":
            params[0].grad.fill_(float("nan"))
        grad_norm = _clip(acc, params, scfg.grad_clip)
        if grad_norm is None:  # DeepSpeed clips (and checks overflow) inside its engine
            grad_norm = torch.zeros(())
        if not torch.isfinite(grad_norm):
            bad = [n for n, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())][:5]
            ids = [data.examples[d][i].id for d, idx in sample.indices.items() for i in idx]
            raise ckpt.NonFiniteError(f"non-finite gradient at step {step_no} (stage {k}) in {bad}; the step's "
                                      f"examples: {_short(ids)}")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.stage_step = step_no, state.stage_step + 1

        stats[-1] = 1.0 if stop.requested else 0.0
        if world > 1:
            stats = acc.reduce(stats.to(acc.device), "sum").cpu()
        seconds = time.perf_counter() - t0
        rec = step_record(state, k, stats, domains, model.domains, lr, float(grad_norm), seconds, sample.rewalked)
        metrics.step(rec, {d: [data.examples[d][i].id for i in idx] for d, idx in sample.indices.items()})
        stopping = bool(stats[-1] > 0)
        if stopping or state.step % cfg.save_every == 0 or state.stage_step == scfg.steps:
            save(cfg, state, sampler, named, optimizer, scheduler, names, fp, acc, wrapped)
            last_saved = state.step
        if stopping:
            metrics.say(f"SIGTERM: checkpoint saved at step {state.step}; exiting with {EXIT_INTERRUPTED}; "
                        "continue with --resume")
            return EXIT_INTERRUPTED

    if last_saved != state.step:
        save(cfg, state, sampler, named, optimizer, scheduler, names, fp, acc, wrapped)
    if cache is not None:
        metrics.say(f"stage 1 cache: {len(cache.store)} examples computed once, {cache.hits} reuses")
    restore_dtypes(model, upcast)  # the exported specialists keep their own dtype
    extra = {"training": {"output_dir": cfg.output_dir, "steps": state.step, "stage": k}}
    if sharded:
        export_gathered(cfg, acc, wrapped, k, base_dir, extra)
    elif k == 1 and acc.is_main_process:
        export_fused(model, Path(cfg.output_dir) / "stage1", base_dir=base_dir, trained=None, extra=extra)
    acc.wait_for_everyone()
    if wrapped is not step_module:
        del wrapped  # a DDP wrapper's gradient hooks must not outlive its stage
        gc.collect()
    return EXIT_OK


# --------------------------------------------------------------------------------------------- helpers


def step_record(state, k, stats, domains, specialists, lr, grad_norm, seconds, rewalked) -> dict:
    D, N = len(domains), len(specialists)
    ce, tok = stats[:D], stats[D : 2 * D]
    wsum = stats[2 * D : 2 * D + D * N].view(D, N)
    tokens = float(tok.sum())
    return {
        "step": state.step,
        "stage": k,
        "stage_step": state.stage_step,
        "loss": float(ce.sum() / tok.sum()),
        "loss_by_domain": {d: float(ce[i] / tok[i]) for i, d in enumerate(domains)},
        "gate": {d: {s: float(wsum[i, j] / tok[i]) for j, s in enumerate(specialists)} for i, d in enumerate(domains)},
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": int(tokens),
        "seq_tokens": int(stats[-2]),
        "tok_per_s": tokens / max(seconds, 1e-9),
        "seconds": seconds,
        "rewalked": rewalked,
    }


def _short(ids: list[str], n: int = 12) -> str:
    return str(ids[:n]) + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def _check_loss(row_ce: torch.Tensor, exs, step_no: int, k: int, acc) -> None:
    bad = ~torch.isfinite(row_ce.detach())
    flag = bad.any().float().reshape(1)
    if acc.num_processes > 1:
        flag = acc.reduce(flag.to(acc.device), "sum").cpu()
    if flag.item() > 0:
        ids = [e.id for e, b in zip(exs, bad.tolist()) if b]
        where = f"examples {_short(ids)}" if ids else "examples on another process"
        raise ckpt.NonFiniteError(f"non-finite loss at step {step_no} (stage {k}): {where}")


def wrap(acc, step_module: TrainStep, optimizer):
    """Wrap for multiple processes: DDP (CPU/gloo or GPU/nccl), or accelerate's FSDP / DeepSpeed engines.

    DDP is built here rather than through `accelerator.prepare`, which keeps a reference to every model it
    wraps: a stage's wrapper (and its gradient hooks) must go away when the stage ends, because stage 2
    trains a different set of parameters.
    """
    from accelerate.utils import DistributedType

    t = acc.distributed_type
    if acc.num_processes == 1 and t == DistributedType.NO:
        return step_module, optimizer
    if t in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = acc.device
        return DDP(step_module, device_ids=[dev.index] if dev.type == "cuda" else None), optimizer
    # FSDP / DeepSpeed (not tested on CPU; see configs/accelerate/README.md)
    return acc.prepare(step_module, optimizer)


def _clip(acc, params, max_norm: float) -> torch.Tensor:
    if max_norm > 0:
        return acc.clip_grad_norm_(params, max_norm)
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())


def make_cache(model, data, sampler, scfg, state, rank, world, amp, metrics) -> HiddenCache:
    """Size the stage-1 cache from the exact examples this process will draw; refuse it above cache_max_gb."""
    keys, draws = set(), 0
    for s in sampler.peek_steps(scfg.per_domain, scfg.steps - state.stage_step):
        for mb in plan_micro_batches(s, rank, world, scfg.micro_batch):
            keys.update(mb)
            draws += len(mb)
    need = HiddenCache.estimate_bytes(model, [data.examples[d][i].n_targets for d, i in keys])
    if need > scfg.cache_max_gb * 2**30:
        raise ConfigError(
            f"stage1.cache_hidden_states would hold {need / 2**30:.1f} GiB ({len(keys)} examples) in this process, "
            f"more than stage1.cache_max_gb={scfg.cache_max_gb}; raise cache_max_gb or set cache_hidden_states=false"
        )
    metrics.say(f"stage 1 cache: {len(keys)} distinct examples for {draws} draws in this process "
                f"(~{need / 2**20:.1f} MiB of hidden states); the specialists run once per distinct example"
                + ("; nothing to reuse: every example is drawn once" if len(keys) == draws else ""))
    return HiddenCache(model, amp)


def save(cfg, state, sampler, named, optimizer, scheduler, names, fp, acc, wrapped) -> None:
    sharded = is_sharded(acc)
    if sharded:  # a collective: every process takes part, the main process gets full tensors
        full = acc.get_state_dict(wrapped)
        want = {n for n, _ in named}
        model_t = {clean_name(k): v for k, v in full.items() if clean_name(k) in want} if acc.is_main_process else {}
    else:
        model_t = {n: p.detach() for n, p in named}
    if acc.is_main_process:
        files = {"model.safetensors": model_t}
        if not sharded:  # under FSDP / ZeRO-3 the optimizer state stays sharded and is not saved (see README)
            opt_t, opt_meta = ckpt.optimizer_files(optimizer, names)
            files.update({"optimizer.safetensors": opt_t, "optimizer.json": opt_meta})
        rng_t, rng_meta = ckpt.rng_files()
        trainer = {"format": 1, "step": state.step, "stage": state.stage, "stage_step": state.stage_step,
                   "sampler": sampler.state_dict(), "fingerprint": fp, "world_size": acc.num_processes,
                   "optimizer_saved": not sharded}
        files.update({"scheduler.json": scheduler.state_dict(), "rng.safetensors": rng_t, "rng.json": rng_meta,
                      "trainer_state.json": trainer})
        ckpt.save_checkpoint(Path(cfg.output_dir) / "checkpoints", state.step, files, cfg.keep_last)
    acc.wait_for_everyone()


def load_weights(start, named) -> None:
    tensors = start.tensors("model.safetensors")
    want = {n for n, _ in named}
    if set(tensors) != want:
        diff = sorted(set(tensors) ^ want)[:5]
        raise ckpt.CheckpointError(f"checkpoint {start.path} holds other parameters than this stage trains (e.g. {diff})")
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[n])


def load_states(start, optimizer, scheduler, names, sharded: bool, metrics) -> None:
    if (start.path / "optimizer.safetensors").is_file() and not sharded:
        ckpt.load_optimizer(optimizer, names, start.tensors("optimizer.safetensors"), start.json("optimizer.json"))
    else:
        metrics.say(f"checkpoint {start.path} has no optimizer state usable here (FSDP / ZeRO-3 run): AdamW moments "
                    "restart, so this resume is not exact (weights, data order and schedule are)")
    scheduler.load_state_dict(start.json("scheduler.json"))
    ckpt.set_rng(start.tensors("rng.safetensors"), start.json("rng.json"))


def export_gathered(cfg, acc, wrapped, k: int, base_dir, extra: dict) -> None:
    """FSDP / ZeRO-3: gather the full weights (a collective) and export them from a fresh CPU copy of the model
    (set up like stage k) on the main process: `OUT/stage1` after stage 1, `OUT/final` after the run's stage."""
    full = acc.get_state_dict(wrapped)
    if acc.is_main_process:
        state = {clean_name(n): v for n, v in full.items()}
        export_from_state(cfg, k, state, base_dir, extra)


def export_from_state(cfg, k: int, state: dict, base_dir, extra: dict) -> None:
    scfg = cfg.stage1 if k == 1 else cfg.stage2
    cpu_model, _ = load_model(cfg.model)
    if k == 2 and scfg.trainable == "lora":
        prepare_stage(cpu_model, 2, scfg, cfg.seed)
    own = dict(cpu_model.named_parameters())
    missing = sorted(n for n in own if n not in state)
    if missing:
        raise ckpt.CheckpointError(f"gathered weights lack {missing[:5]}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n].to(p.dtype))
    out = Path(cfg.output_dir)
    if k == 1:
        export_fused(cpu_model, out / "stage1", base_dir=base_dir, trained=None, extra=extra)
    export_fused(cpu_model, out / "final", base_dir=base_dir, trained=scfg.trainable if k == 2 else None, extra=extra)


def is_sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def clean_name(name: str) -> str:
    """A FusedModel parameter name from a wrapped TrainStep's (FSDP / DeepSpeed wrappers removed)."""
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    name = name.removeprefix("module.")
    return name.removeprefix("model.")


def check_sharded(acc, scfg: StageConfig, n_domains: int) -> None:
    from accelerate.utils import DistributedType

    per_process = scfg.per_domain * n_domains // acc.num_processes
    if acc.distributed_type == DistributedType.DEEPSPEED and per_process > scfg.micro_batch:
        raise ConfigError(
            f"under DeepSpeed every process must run one micro-batch per step (its engine steps on every backward "
            f"with gradient_accumulation_steps=1): set micro_batch >= {per_process} "
            f"(= per_domain x domains / processes), or use FSDP"
        )
