"""Training throughput and memory of the fused model, measured, next to a single-model fine-tune, in one run.

    PYTHONPATH=src python bench/train.py --shape tiny --device cpu --out /tmp/train.json      # < 1 min on 2 cores
    PYTHONPATH=src python bench/train.py --shape llama2-7b --device cuda --out train.json     # one H100/H200

Specialists are Hugging Face models of real shapes with random bf16 weights (never zeros), built in memory;
their depth is truncated so that every mode fits one GPU (the output says how many of how many layers). Modes,
each on fresh models, steps timed after warm-up with synchronised clocks (median):

  single            one specialist, all parameters train (the same harness: FusedModel with one specialist)
  stage1            three frozen specialists under torch.no_grad(), only the gate trains (paper stage 1)
  stage2-full       gate + all specialist parameters train
  stage2-full-ckpt  the same with activation checkpointing
  stage2-lora       gate + LoRA adapters (PEFT, r=16 on every linear) on frozen specialists

Optimizers: bf16 parameters get fp32 master weights and fp32 Adam moments (16 bytes per parameter, the precision
scheme `ultrafuser plan` assumes); fp32 parameters (gate, LoRA) plain torch AdamW. Gradients stay allocated between
steps (zero_grad(set_to_none=False)), as they do across micro-batches of gradient accumulation.

Reported per mode: tokens/s (training tokens: each is read by every specialist), model-FLOPs utilisation
(c * N * tokens / time / peak, N = parameters without the input embedding, c = 6 full, 4 LoRA (no weight
gradients), 2 stage 1 (forward only), + 6 * gate params; the peak is the card's dense bf16 rate: 989 TFLOP/s for
H100/H200 SXM, stated in the output) and `mfu_palm`, which adds attention's FLOPs as PaLM's appendix B counts
them (12 * layers * hidden * seq per token, 4 forward only), peak memory (torch.cuda.max_memory_allocated), and `ultrafuser plan`'s
estimate of it for the same setting with the ratio (goal: within +-15 %). JSON to --out; a table printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig  # noqa: E402
from ultrafuser.data.conversation import FusedBatch  # noqa: E402
from ultrafuser.modeling.fused import FusedModel, fused_loss  # noqa: E402
from ultrafuser.modeling.specialists import Specialist  # noqa: E402
from ultrafuser.plan import Arch, GiB, Setting, SpecInfo, estimate  # noqa: E402

# name -> (hub id it copies, overrides); numbers from plan.KNOWN_ARCHITECTURES (public config.json values)
SHAPES = {
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=512,
    ),
    "llama2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
}
MODES = ["single", "stage1", "stage2-full", "stage2-full-ckpt", "stage2-lora"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DOMAINS = ("text", "code", "math")


def hf_config(shape: str, layers: int):
    from transformers import AutoConfig

    d = dict(SHAPES[shape])
    mt = d.pop("model_type")
    d["num_hidden_layers"] = layers
    return AutoConfig.for_model(mt, **d, tie_word_embeddings=False, use_cache=False)


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no peak for a CPU: MFU not computed"
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name or "H800" in name:
        return 989.0, f"{name}: 989 TFLOP/s dense bf16 (H100/H200 SXM datasheet)"
    if "A100" in name:
        return 312.0, f"{name}: 312 TFLOP/s dense bf16 (A100 datasheet)"
    return None, f"{name}: peak unknown, MFU not computed (pass --peak-tflops)"


class MasterAdamW:
    """AdamW for bf16 parameters with an fp32 master copy and fp32 moments (16 bytes per parameter in all, the
    layout DeepSpeed's bf16 optimizer and FSDP mixed precision keep). One parameter at a time, so the transient
    memory is one parameter's fp32 gradient; the update is PyTorch's fused AdamW kernel (`fused=True`, one pass
    over weight, gradient and moments instead of the eleven separate element-wise passes this class made before;
    `--unfused-adam` keeps those for comparison)."""

    def __init__(self, params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True):
        self.fused = fused  # False: the earlier element-wise passes (kept to measure the difference)
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        self.m = [torch.zeros_like(x) for x in self.master]
        self.v = [torch.zeros_like(x) for x in self.master]
        self.steps = [torch.zeros((), dtype=torch.float32, device=x.device) for x in self.master]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay

    @torch.no_grad()
    def step(self):
        from torch.optim.adamw import adamw

        b1, b2 = self.betas
        for p, w, m, v, t in zip(self.params, self.master, self.m, self.v, self.steps):
            if p.grad is None:
                continue
            g = p.grad.float()
            if self.fused:
                adamw([w], [g], [m], [v], [], [t], fused=True, amsgrad=False, beta1=b1, beta2=b2, lr=self.lr,
                      weight_decay=self.wd, eps=self.eps, maximize=False)
            else:
                t += 1
                c1, c2 = 1 - b1 ** t.item(), 1 - b2 ** t.item()
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                w.mul_(1 - self.lr * self.wd).addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)
            del g
            p.copy_(w)

    def zero_grad(self):
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()


def build(shape: str, layers: int, n: int, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM

    cfg = hf_config(shape, layers)
    models = []
    for k in range(n):
        torch.manual_seed(seed + k)
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        models.append(m.requires_grad_(False).eval())
    return cfg, models


def fused_of(models, gate_mode: str) -> FusedModel:
    specs = [
        SpecialistConfig(domain=DOMAINS[k], path=f"bench:{k}", dtype="bfloat16") for k in range(len(models))
    ]
    gate = GateConfig(mode=gate_mode)
    fc = FuseConfig(specialists=specs, gate=gate)
    wrapped = [
        Specialist(config=s, model=m, adapter=None, tokenizer=None, renderer=None)
        for s, m in zip(specs, models)
    ]
    return FusedModel(fc, wrapped, vocab_size=models[0].config.vocab_size, eos_token_id=0)


def make_batch(n: int, batch: int, seq: int, vocab: int, device: torch.device, seed: int) -> FusedBatch:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]
    ones = torch.ones(batch, seq, dtype=torch.long, device=device)
    pos = torch.arange(seq, device=device).expand(batch, seq).contiguous()
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)  # every position is a target
    return FusedBatch(ids, [ones] * n, [pos] * n, [pos] * n, labels)


def setting_for(mode: str, batch: int, seq: int, lora_r: int) -> Setting:
    stage = 1 if mode == "stage1" else 2
    trainable = "gate" if stage == 1 else ("lora" if mode == "stage2-lora" else "full")
    return Setting(
        stage=stage,
        trainable=trainable,
        micro_batch=batch,
        per_domain=batch,
        n_domains=1,
        max_length=seq,
        checkpointing=mode.endswith("ckpt"),
        lora_r=lora_r,
        lora_targets=LORA_TARGETS,
        gate_mode="uniform" if mode == "single" else "learned",
        kv_repeated=False,
        headroom=0.0,
    )


def plan_estimate(cfg, mode: str, batch: int, seq: int, lora_r: int):
    arch = Arch.from_config_dict(cfg.to_dict(), "bench")
    n = 1 if mode == "single" else 3
    specs = [SpecInfo(DOMAINS[k], f"bench:{k}", arch, f"bench:{k}", 2) for k in range(n)]
    return estimate(specs, setting_for(mode, batch, seq, lora_r))


def plan_bytes(cfg, mode: str, batch: int, seq: int, lora_r: int) -> float:
    return plan_estimate(cfg, mode, batch, seq, lora_r).total


def run_mode(mode: str, args, device: torch.device, layers: int) -> dict:
    n = 1 if mode == "single" else 3
    cfg, models = build(args.shape, layers, n, device, args.seed)
    if mode == "stage2-lora":
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
        )
        models = [get_peft_model(m, lc).base_model.model for m in models]  # LoRA layers injected in place
    if mode in ("single", "stage2-full", "stage2-full-ckpt"):
        for m in models:
            m.requires_grad_(True)
    for m in models:
        m.train()
        if mode.endswith("ckpt"):  # (newer transformers call it activation_checkpointing_enable; both work)
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = fused_of(models, "uniform" if mode == "single" else "learned")
    if model.gate is not None:
        model.gate.requires_grad_(True)
    big = [p for m in models for p in m.parameters() if p.requires_grad and p.dtype == torch.bfloat16]
    small = [p for p in model.parameters() if p.requires_grad and p.dtype == torch.float32]
    opts = ([MasterAdamW(big, fused=not args.unfused_adam)] if big else []) + ([torch.optim.AdamW(small, lr=2e-5)] if small else [])
    batch = make_batch(n, args.batch, args.seq, cfg.vocab_size, device, args.seed)
    trained = sum(p.numel() for p in big) + sum(p.numel() for p in small)

    cuda = device.type == "cuda"

    def mark(probe, name):  # peak memory of the phase that just ended (instrumented step only)
        if probe is not None and cuda:
            torch.cuda.synchronize(device)
            probe[name] = round(torch.cuda.max_memory_allocated(device) / GiB, 3)
            torch.cuda.reset_peak_memory_stats(device)

    def step(probe=None):
        if probe is not None and cuda:
            probe["before"] = round(torch.cuda.memory_allocated(device) / GiB, 3)
            torch.cuda.reset_peak_memory_stats(device)
        if mode == "stage1":
            with torch.no_grad():  # frozen specialists: no autograd graph, nothing saved for backward
                hiddens, logits = model.run_specialists(batch)
            z, w = model.mix(hiddens, logits)
            loss = fused_loss(z, batch.labels)
            del hiddens, logits
        else:
            out = model(batch)
            z, w, loss = out.logits, out.gate_weights, out.loss
            del out
        mark(probe, "forward")
        loss.backward()  # the fused logits stay referenced until here, as in a trainer that logs gate weights
        del z, w
        mark(probe, "backward")
        for o in opts:
            o.step()
        mark(probe, "optimizer")
        for o in opts:
            o.zero_grad(set_to_none=False) if isinstance(o, torch.optim.Optimizer) else o.zero_grad()
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    loss = loss.detach().float().item()
    peak_bytes = torch.cuda.max_memory_allocated(device) if cuda else None
    probe: dict = {}
    if cuda:
        step(probe)  # one more step, instrumented: peak of each phase
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    arch = Arch.from_config_dict(cfg.to_dict(), "bench")
    c = {"stage1": 2, "stage2-lora": 4}.get(mode, 6)
    gate_p = sum(p.numel() for p in model.gate.parameters()) if model.gate is not None else 0
    flops = c * n * arch.flop_params() * tokens + 6 * gate_p * n * tokens
    # PaLM's MFU (Chowdhery et al. 2022, appendix B) also counts attention's score and value products: 12 * L * H
    # * Q * T FLOPs per token with a backward pass (L layers, H heads of size Q, sequence length T; causal masking
    # not subtracted), 4 * L * H * Q * T forward only (stage 1). Reported next to the weights-only figure.
    attn = (4 if mode == "stage1" else 12) * n * arch.num_layers * arch.num_heads * arch.hd * args.seq * tokens
    peak, _ = peak_tflops(device) if args.peak_tflops is None else (args.peak_tflops, "")
    out = {
        "specialists": n,
        "layers": layers,
        "trainable_params": trained,
        "loss": round(loss, 4),
        "step_ms": round(step_s * 1e3, 2),
        "step_ms_all": [round(t * 1e3, 2) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "model_flops_per_step": flops,
        "mfu": round(flops / step_s / (peak * 1e12), 4) if peak else None,
        "attention_flops_per_step": attn,
        "mfu_palm": round((flops + attn) / step_s / (peak * 1e12), 4) if peak else None,
        "plan_gib": round(plan_bytes(cfg, mode, args.batch, args.seq, args.lora_r) / GiB, 6),
    }
    est = plan_estimate(cfg, mode, args.batch, args.seq, args.lora_r)
    out["plan_components_gib"] = {k: round(v / GiB, 3) for k, v in est.memory.items() if v}
    if cuda:
        out["phase_peaks_gib"] = probe
        out["peak_gib"] = round(peak_bytes / GiB, 3)
        out["plan_ratio"] = round(out["plan_gib"] / out["peak_gib"], 3)
        out["plan_within_15pct"] = abs(out["plan_ratio"] - 1) <= 0.15
    if not math.isfinite(loss):
        out["error"] = f"loss is {loss}"
    return out  # the models and optimizer states go with this frame; main() collects and empties the cache


def pick_layers(args, device: torch.device, modes: list[str]) -> int:
    full = SHAPES[args.shape]["num_hidden_layers"]
    want = min(args.layers or (full if args.shape == "tiny" else 8), full)
    if device.type != "cuda":
        return want
    budget = 0.85 * torch.cuda.get_device_properties(device).total_memory
    for layers in range(want, 0, -1):  # the deepest truncation every mode fits, by plan's estimate
        cfg = hf_config(args.shape, layers)
        if all(plan_bytes(cfg, m, args.batch, args.seq, args.lora_r) <= budget for m in modes):
            return layers
    return 1


def table(res: dict) -> str:
    rows = [
        f"{'mode':18} {'tok/s':>10} {'step ms':>9} {'MFU':>6} {'MFU+att':>7} {'peak GiB':>9} {'plan GiB':>9} "
        f"{'plan/peak':>9}"
    ]
    for mode, r in res["modes"].items():
        if "error" in r and "step_ms" not in r:
            rows.append(f"{mode:18} error: {r['error'][:80]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        mfu_a = f"{r['mfu_palm']:.1%}" if r.get("mfu_palm") is not None else "-"
        pk = f"{r['peak_gib']:.3g}" if "peak_gib" in r else "-"
        ratio = f"{r['plan_ratio']:.2f}" if "plan_ratio" in r else "-"
        rows.append(
            f"{mode:18} {r['tokens_per_s']:>10.1f} {r['step_ms']:>9.1f} {mfu:>6} {mfu_a:>7} {pk:>9} {r['plan_gib']:>9.3g} "
            f"{ratio:>9}"
        )
    for k, v in res.get("ratios", {}).items():
        rows.append(f"{k}: {v}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument(
        "--layers",
        type=int,
        help="decoder layers per specialist (default: 8 for real shapes, "
        "fewer if a mode would not fit the card)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    ap.add_argument(
        "--seq", type=int, help="tokens per sequence, every one a target (default 64 tiny, 2048 real shapes)"
    )
    ap.add_argument("--steps", type=int, help="timed steps per mode (default 2 on CPU, 5 on a GPU)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 1 on CPU, 2 on a GPU)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--unfused-adam", action="store_true",
                    help="the bf16 parameters' AdamW as separate element-wise passes (the earlier harness)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: from its name)")
    ap.add_argument("--threads", type=int, help="torch threads (default 1 for the tiny shape on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument(
        "--summarize", nargs="+", metavar="JSON", help="only print the compact table of result files"
    )
    args = ap.parse_args(argv)
    if args.summarize:
        for f in args.summarize:
            r = json.loads(Path(f).read_text())
            print(
                f"== {f}: {r['device']}, {r['shape']} ({r['truncated']}), batch {r['batch']} x {r['seq']}, "
                f"peak {r['peak_tflops']} TFLOP/s, torch {r['torch']}, transformers {r['transformers']}"
            )
            print(table(r))
        return 0
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads or (args.device == "cpu" and args.shape == "tiny"):
        torch.set_num_threads(
            args.threads or 1
        )  # tiny shapes are op-overhead bound: one thread, no barrier stalls
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.seq = args.seq or (64 if args.shape == "tiny" else 2048)
    args.steps = args.steps or (5 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    import transformers

    layers = pick_layers(args, device, modes)
    full = SHAPES[args.shape]["num_hidden_layers"]
    peak, peak_note = peak_tflops(device) if args.peak_tflops is None else (args.peak_tflops, "given")
    res = {
        "bench": "train",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "layers": layers,
        "layers_full": full,
        "truncated": f"{layers} of {full} layers per specialist" if layers < full else "full depth",
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": args.batch * args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": peak,
        "peak_note": peak_note,
        "dtype": "bfloat16",
        "master_adamw": "unfused element-wise passes" if args.unfused_adam else "fused kernel",
        "modes": {},
    }
    print(
        f"train bench: {res['device']}, shape {args.shape} ({res['truncated']}), batch {args.batch} x {args.seq}",
        flush=True,
    )
    for mode in modes:
        t0 = time.perf_counter()
        try:
            res["modes"][mode] = run_mode(mode, args, device, layers)
        except Exception as e:  # noqa: BLE001 -- record and go on: one mode's failure must not lose the others
            res["modes"][mode] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:],
            }
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res["modes"][mode]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"  {mode}: {json.dumps({k: v for k, v in res['modes'][mode].items() if k != 'traceback'})}",
            flush=True,
        )
    m = res["modes"]
    ok = {k: v for k, v in m.items() if "tokens_per_s" in v}
    if "single" in ok:
        single = ok["single"]["tokens_per_s"]
        for k in ("stage1", "stage2-full", "stage2-full-ckpt", "stage2-lora"):
            if k in ok:
                res.setdefault("ratios", {})[f"{k} tok/s / (single / 3)"] = round(
                    ok[k]["tokens_per_s"] / (single / 3), 3
                )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    return 0 if all("error" not in v for v in m.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
