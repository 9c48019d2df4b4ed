"""Fused decoding benchmark: naive (the core's reference path) vs fast (modeling/fast.py), one run, one device.

    python bench/decode.py --shape tiny --device cpu --json out.json            # < 1 min on 2 CPU cores
    python bench/decode.py --shape smollm2-135m --device cpu --steps 32 --prompt-len 64 --batches 1,4 --json o.json
    python bench/decode.py --shape llama2-7b --shape qwen2.5-7b --device cuda --json out.json   # see gpu_decode.sh

What it does (docs/performance.md §4): measures the copy bandwidth; builds N random-weight models of a real shape
directly on the device (normal init, small std, never zeros); runs, per batch size, interleaved after warm-up
(A B C D A B C D …): naive-single, naive-fused, fast-single, fast-fused (+ fast-fused-refs where the fast path
copies weights), then the LoRA-shared phase (one base, an adapter per specialist — `--lora-adapters 2` leaves the
first one the bare base —: naive-lora, fast-lora, fast-single);
times every step through the generation stream (host clocks after the per-step sync: the token ids must reach
the host); reports the median ms/step, tok/s, the fraction of the floor (bytes_step / bandwidth with
bytes_step = N × (params × bytes + KV bytes), LoRA: base + adapters + N × KV) and performance.md's ratios (with
several repetitions, the two headline ratios also per repetition: `*_per_rep`, the spread inside the run);
checks the fast tokens against the naive ones (`tokens_match`) and teacher-forced logits; writes JSON after
every measurement (a crash or timeout keeps what was measured) and prints a compact table last.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

SHAPES = {
    # tiny: 3 specialists with different rope_theta (per-specialist RoPE inside one stacked group)
    "tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
        "rope_thetas": [10000.0, 20000.0, 500000.0],
        "std": 0.15,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_thetas": [100000.0],
        "std": 0.04,
    },
    "llama2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "rope_thetas": [10000.0],
        "std": 0.02,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "rope_thetas": [1000000.0],
        "std": 0.02,
    },
}
N_SPEC = 3
DOMAINS = ["text", "code", "math"]


# --------------------------------------------------------------------------------------------- helpers


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, gib: float) -> float:
    """Bytes read + written per second of a device-to-device copy of `gib` GiB buffers (median of 5)."""
    n = int(gib * (1 << 30)) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5 if torch.device(device).type == "cuda" else 3):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n * 4 / statistics.median(times)


class StubTokenizer:
    """The bench needs no text: decode to nothing, pad with 0."""

    pad_token_id = 0
    eos_token_id = 1
    eos_token = "</s>"

    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=False):
        return ""

    def __len__(self):
        return self.vocab


def build_models(shape: str, n: int, device, dtype, seed: int = 0):
    """n random models of `shape`, built directly on `device` in `dtype` (normal init, no CPU round trip)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    thetas, std, mt = spec.pop("rope_thetas"), spec.pop("std"), spec.pop("model_type")
    models = []
    old = torch.get_default_dtype()
    for k in range(n):
        cfg = AutoConfig.for_model(
            mt, **spec, rope_theta=thetas[k % len(thetas)], eos_token_id=1, bos_token_id=None, pad_token_id=0
        )
        if hasattr(cfg, "rope_parameters") and isinstance(cfg.rope_parameters, dict):
            cfg.rope_parameters["rope_theta"] = thetas[k % len(thetas)]
        torch.manual_seed(seed + k)
        try:
            torch.set_default_dtype(dtype)
            with torch.device(device):
                try:
                    m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
                except TypeError:  # older transformers: the default dtype set above does it
                    m = AutoModelForCausalLM.from_config(cfg)
        finally:
            torch.set_default_dtype(old)
        m = m.eval().requires_grad_(False)
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(seed * 100 + k)
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device, dtype=torch.float32))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=g, device=device, dtype=torch.float32))
        models.append(m)
    return models


def make_fused(models, adapters=None, gate: str = "learned", seed: int = 0):
    """A FusedModel straight from in-memory models (no files, no tokenizer beyond a stub)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
    from ultrafuser.modeling.fused import FusedModel
    from ultrafuser.modeling.specialists import Specialist

    adapters = adapters or [None] * len(models)
    # like load_specialists: every specialist on a PEFT-injected model manages its adapter state
    tuner = [m for m in models[0].modules() if isinstance(m, BaseTunerLayer)]
    vocab = models[0].get_output_embeddings().weight.shape[0]
    tok = StubTokenizer(vocab)
    cfgs = [SpecialistConfig(domain=DOMAINS[k], path=f"<memory:{k}>") for k in range(len(models))]
    specs = [
        Specialist(config=c, model=m, adapter=a, tokenizer=tok, renderer=None, _tuner_layers=list(tuner))
        for c, m, a in zip(cfgs, models, adapters)
    ]
    fused = FusedModel(
        FuseConfig(specialists=cfgs, gate=GateConfig.parse(gate)), specs, vocab, tok.eos_token_id
    )
    if fused.gate is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in fused.gate.parameters():
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
    return fused.eval()


def lora_adapters(k: int) -> list:
    """The LoRA phase's adapter name per specialist: the last k domains get one, the others are the bare base."""
    return [None] * (N_SPEC - k) + DOMAINS[N_SPEC - k :]


def add_lora(base, rank: int, std: float, names=("code", "math")):
    """Inject random LoRA adapters (one per name) into `base` in place, PEFT style; return the base."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft = get_peft_model(base, cfg, adapter_name=names[0])
    for n in names[1:]:
        peft.add_adapter(n, cfg)
    g = torch.Generator(device=base.device).manual_seed(7)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(std * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32))
    base.requires_grad_(False)
    return base


def make_prompts(n_spec, batch, length, vocab, seed, vary=False):
    """Random prompts of `length` tokens; with `vary`, rows get shorter and each specialist gets its own prefix
    (as different chat templates would), so left padding differs per row and per specialist."""
    from ultrafuser.data.conversation import Aligned

    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        n = max(4, length - 5 * b) if vary else length
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        per = [
            torch.randint(3, vocab, (2 * k,), generator=g).tolist() + ids if vary else list(ids)
            for k in range(n_spec)
        ]
        out.append(Aligned(input_ids=per, target_positions=[[]] * n_spec, targets=[]))
    return out


def reference_stream(model, prompts, params):
    """The core's straightforward path, even if generation.stream learns to pick the fast path by itself."""
    import inspect

    from ultrafuser.modeling import generation

    kw = {"fast": False} if "fast" in inspect.signature(generation.stream).parameters else {}
    return generation.stream(model, prompts, params, **kw)


def first_only(prompts):
    """The same prompts for a one-specialist model."""
    from ultrafuser.data.conversation import Aligned

    return [
        Aligned(input_ids=p.input_ids[:1], target_positions=p.target_positions[:1], targets=p.targets)
        for p in prompts
    ]


def with_bucket(dec, bucket: int, run):
    """`run(prompts, params)` (an event stream of `dec`) with dec's attention bucket set to `bucket` while it runs:
    the same decoder, weights and caches, its graphs keyed by attention length (--also-bucket)."""

    def go(p, s):
        old = dec.bucket
        dec.bucket = bucket
        try:
            yield from run(p, s)
        finally:
            dec.bucket = old

    return go


def timed_stream(it, device):
    """Consume a token-event iterator; return (prefill ms, [ms per step], token ids per row)."""
    sync(device)
    t0 = time.perf_counter()
    stamps, toks = [], {}
    for events in it:
        stamps.append(time.perf_counter())
        for e in events:
            toks.setdefault(e.row, []).append(e.token_id)
    prefill = (stamps[0] - t0) * 1e3
    steps = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]
    return prefill, steps, [toks[b] for b in sorted(toks)]


def compare(a, b) -> dict:
    """Token lists per row: exact match, first divergence, matched prefix fraction."""
    first, fracs = None, []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        if n < max(len(x), len(y)):
            first = n if first is None else min(first, n)
        fracs.append(n / max(1, max(len(x), len(y))))
    return {
        "exact": first is None and len(a) == len(b),
        "first_divergence": first,
        "matched_prefix_frac": round(sum(fracs) / max(1, len(fracs)), 4),
    }


def model_bytes(models, lora=False):
    seen, tot = set(), 0
    for m in models:
        for n, p in m.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            tot += p.numel() * p.element_size()
    return tot


def kv_bytes(model, batch, ctx):
    from ultrafuser.modeling.fast_llama import describe

    a = describe(model)
    el = model.get_output_embeddings().weight.element_size()
    return 2 * a.layers * a.kv_heads * a.head_dim * batch * ctx * el


# --------------------------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.out = {"tokens_match": None, "env": {}, "shapes": {}, "errors": []}
        self.matches: list[bool] = []

    def left(self) -> float:
        return self.args.time_budget - (time.perf_counter() - self.t0)

    def save(self):
        ok = [m for m in self.matches if m is not None]
        self.out["tokens_match"] = all(ok) if ok else None
        self.out["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.args.json:
            tmp = Path(self.args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(self.out, indent=1, default=str))
            tmp.replace(self.args.json)

    def log(self, *a):
        print(f"[{time.perf_counter() - self.t0:7.1f}s]", *a, flush=True)

    def env(self):
        import transformers

        dev = torch.device(self.args.device)
        e = self.out["env"]
        e.update(
            torch=torch.__version__,
            transformers=transformers.__version__,
            python=platform.python_version(),
            device=str(dev),
            threads=torch.get_num_threads(),
            date=time.strftime("%Y-%m-%d"),
            dtype=self.args.dtype,
            prompt_len=self.args.prompt_len,
            steps=self.args.steps,
            decode_attention=self.args.decode_attention,
        )
        if dev.type == "cuda":
            e["device_name"] = torch.cuda.get_device_name(dev)
            e["device_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / (1 << 30), 1)
        else:
            e["device_name"] = f"CPU ({os.cpu_count()} cores: {platform.processor() or platform.machine()})"
            try:
                e["loadavg_at_start"] = os.getloadavg()
            except OSError:
                pass
        gib = self.args.bw_gib if self.args.bw_gib else (2.0 if dev.type == "cuda" else 0.25)
        bw = copy_bandwidth(dev, gib)
        e["copy_bandwidth_GBps"] = round(bw / 1e9, 2)
        e["copy_buffer_gib"] = gib
        self.bw = bw
        self.log(f"device {e['device_name']}  copy bandwidth {bw / 1e9:.1f} GB/s ({gib} GiB buffers)")
        self.save()

    # ------------------------------------------------------------------ one mode
    def run_mode(self, res, mode, fn, device):
        try:
            prefill, steps, toks = timed_stream(fn(), device)
            r = res.setdefault(mode, {"steps_ms": [], "prefill_ms": []})
            r["steps_ms"] += steps
            r.setdefault("rep_ms", []).append(round(statistics.median(steps), 3))  # this repetition's median
            r["prefill_ms"].append(prefill)
            r["tokens"] = toks
            return True
        except Exception as e:  # noqa: BLE001 - one mode failing must not lose the others
            msg = f"{mode}: {type(e).__name__}: {e}"
            self.log("ERROR", msg)
            traceback.print_exc()
            res.setdefault(mode, {})["error"] = msg
            self.out["errors"].append(msg)
            return False

    def phase(self, shape_out, label, modes: dict, batches, device, bytes_of, n_reps, fallbacks=None):
        """modes: name -> callable(prompts, params) -> event iterator. Interleaved after warm-up, per batch size.
        fallbacks: name -> callable() -> mode callable, tried (as NAME-eager) when NAME fails its warm-up."""
        from ultrafuser.modeling.generation import SamplingParams

        a = self.args
        params = SamplingParams(max_new_tokens=a.steps, ignore_eos=True)
        warm = SamplingParams(max_new_tokens=4, ignore_eos=True)
        for B in batches:
            if self.left() < 20:
                self.log(f"time budget reached: skipping {label} batch {B}")
                break
            res = shape_out.setdefault(f"batch{B}", {})
            prompts = make_prompts(N_SPEC, B, a.prompt_len, self.vocab, seed=B, vary=a.vary)
            for mode, fn in modes.items():  # warm-up: on CUDA full length for fast (captures every graph)
                self.log(f"{label} B={B} warm-up {mode}")
                try:
                    full = mode.startswith("fast") and device.type == "cuda"
                    it = fn(prompts[:], params if full else warm)
                    timed_stream(it, device)
                except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                    msg = f"{mode} warm-up B={B}: {type(e).__name__}: {e}"
                    self.log("ERROR", msg)
                    traceback.print_exc()
                    res.setdefault(mode, {})["error"] = msg
                    self.out["errors"].append(msg)
            for mode in list(modes):
                if (
                    "error" in res.get(mode, {})
                    and fallbacks
                    and mode in fallbacks
                    and f"{mode}-eager" not in modes
                ):
                    self.log(f"{mode} failed: trying it without CUDA graphs as {mode}-eager")
                    try:
                        modes[f"{mode}-eager"] = fallbacks[mode]()
                        timed_stream(modes[f"{mode}-eager"](prompts[:], params), device)
                    except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                        msg = f"{mode}-eager warm-up B={B}: {type(e).__name__}: {e}"
                        traceback.print_exc()
                        res.setdefault(f"{mode}-eager", {})["error"] = msg
                        self.out["errors"].append(msg)
            live = [m for m in modes if "error" not in res.get(m, {})]
            for rep in range(n_reps):
                if rep > 0 and self.left() < a.reserve_s:
                    self.log("time budget: fewer repetitions")
                    break
                for mode in live:
                    if mode.startswith("naive") and rep >= a.naive_reps:
                        continue
                    self.run_mode(
                        res, mode, lambda mode=mode, prompts=prompts: modes[mode](prompts, params), device
                    )
                    self.summarise(res, mode, B, bytes_of(mode, B))
                    self.save()
            self.log(
                f"{label} B={B}: "
                + ", ".join(f"{m} {res[m].get('ms_step', float('nan')):.2f} ms" for m in modes if m in res)
            )

    def summarise(self, res, mode, B, nbytes):
        r = res[mode]
        if not r.get("steps_ms"):
            return
        ms = statistics.median(r["steps_ms"])
        r["ms_step"] = round(ms, 3)
        r["tok_s_per_seq"] = round(1e3 / ms, 2)
        r["tok_s_total"] = round(B * 1e3 / ms, 2)
        r["prefill_ms_median"] = round(statistics.median(r["prefill_ms"]), 2)
        r["bytes_step"] = nbytes
        r["floor_ms"] = round(nbytes / self.bw * 1e3, 3)
        r["frac_floor"] = round(nbytes / self.bw * 1e3 / ms, 4)

    def ratios(self, res, B):
        def ms(m):
            return res.get(m, {}).get("ms_step")

        def pf(m):
            return res.get(m, {}).get("prefill_ms_median")

        def per_rep(num, den, k):  # k·num/den for each repetition: the modes run interleaved, so rep i pairs them
            a, b = res.get(num, {}).get("rep_ms") or [], res.get(den, {}).get("rep_ms") or []
            return [round(k * x / y, 3) for x, y in zip(a, b)]

        rt = {}
        # the spread of the two headline ratios inside this run (one value per repetition, when there are several)
        for key, num, den, k in (("fast_fused_tput_vs_single_over_3_per_rep", "fast-single", "fast-fused", 3),
                                 ("lora_shared_tput_vs_single_per_rep", "fast-single", "fast-lora", 1)):
            if len(v := per_rep(num, den, k)) > 1:
                rt[key] = v
        if ms("fast-fused") and ms("fast-single"):
            rt["fast_fused_vs_3x_single"] = round(ms("fast-fused") / (3 * ms("fast-single")), 3)
            rt["fast_fused_tput_vs_single_over_3"] = round(3 * ms("fast-single") / ms("fast-fused"), 3)
        if ms("naive-fused") and ms("naive-single"):
            rt["naive_fused_vs_3x_single"] = round(ms("naive-fused") / (3 * ms("naive-single")), 3)
        if ms("fast-fused") and ms("naive-single"):
            rt["fast_fused_tput_vs_naive_single_over_3"] = round(3 * ms("naive-single") / ms("fast-fused"), 3)
        if ms("fast-fused") and ms("naive-fused"):
            rt["fast_vs_naive_fused_speedup"] = round(ms("naive-fused") / ms("fast-fused"), 2)
        if ms("fast-lora") and ms("fast-single"):
            rt["lora_shared_vs_one_model"] = round(ms("fast-lora") / ms("fast-single"), 3)
            rt["lora_shared_tput_vs_single"] = round(ms("fast-single") / ms("fast-lora"), 3)
        if ms("fast-lora") and ms("naive-single"):
            rt["lora_shared_tput_vs_naive_single"] = round(ms("naive-single") / ms("fast-lora"), 3)
        if ms("fast-lora") and ms("naive-lora"):
            rt["fast_vs_naive_lora_speedup"] = round(ms("naive-lora") / ms("fast-lora"), 2)
        for m in ("single", "fused", "lora"):  # --also-kv-model: what the fp32 CPU cache gains, same run
            if ms(f"fast-{m}") and ms(f"fast-{m}-kvmodel"):
                rt[f"fast_{m}_speedup_vs_kv_cache_in_model_dtype"] = round(ms(f"fast-{m}-kvmodel") / ms(f"fast-{m}"), 3)
        if ms("fast-lora") and ms("fast-lora-memberheads"):
            rt["fast_lora_speedup_vs_member_heads"] = round(ms("fast-lora-memberheads") / ms("fast-lora"), 3)
        if ms("fast-lora-noadapters") and ms("fast-single"):
            rt["no_adapters_tput_vs_single"] = round(ms("fast-single") / ms("fast-lora-noadapters"), 3)
        if ms("fast-lora") and ms("fast-lora-lowp"):
            rt["fast_lora_speedup_vs_lora_terms_in_model_dtype"] = round(ms("fast-lora-lowp") / ms("fast-lora"), 3)
        if ms("fast-lora-kvmodel") and ms("fast-single-kvmodel"):
            rt["lora_shared_tput_vs_single_kv_cache_in_model_dtype"] = round(
                ms("fast-single-kvmodel") / ms("fast-lora-kvmodel"), 3)
        b = self.args.also_bucket
        if b:  # the decoders' default (growing) buckets vs a fixed one, same run
            for m in ("single", "fused", "lora"):
                if ms(f"fast-{m}") and ms(f"fast-{m}-b{b}"):
                    rt[f"fast_{m}_speedup_vs_bucket{b}"] = round(ms(f"fast-{m}-b{b}") / ms(f"fast-{m}"), 3)
            if ms(f"fast-lora-b{b}") and ms(f"fast-single-b{b}"):
                rt[f"lora_shared_vs_one_model_bucket{b}"] = round(ms(f"fast-lora-b{b}") / ms(f"fast-single-b{b}"), 3)
            if ms(f"fast-fused-b{b}") and ms(f"fast-single-b{b}"):
                rt[f"fast_fused_tput_vs_single_over_3_bucket{b}"] = round(
                    3 * ms(f"fast-single-b{b}") / ms(f"fast-fused-b{b}"), 3)
        if pf("fast-fused") and pf("fast-single"):
            rt["prefill_fast_fused_vs_3x_single"] = round(pf("fast-fused") / (3 * pf("fast-single")), 3)
        if pf("naive-fused") and pf("naive-single"):
            rt["prefill_naive_fused_vs_3x_single"] = round(pf("naive-fused") / (3 * pf("naive-single")), 3)
        if pf("fast-fused") and pf("naive-fused"):
            rt["prefill_fast_vs_naive_fused"] = round(pf("fast-fused") / pf("naive-fused"), 3)
        checks = {}
        for fast, ref in (
            ("fast-fused", "naive-fused"),
            ("fast-single", "naive-single"),
            ("fast-lora", "naive-lora"),
            ("fast-lora-memberheads", "naive-lora"),
            ("fast-lora-lowp", "naive-lora"),
            ("fast-fused-refs", "naive-fused"),
            ("fast-fused-sdpa", "naive-fused"),
            *((f"fast-{m}-b{b}", f"naive-{m}") for m in ("fused", "single", "lora") if b),
        ):
            ta, tb = res.get(fast, {}).get("tokens"), res.get(ref, {}).get("tokens")
            if ta and tb:
                c = compare(ta, tb)
                checks[f"{fast}=={ref}"] = c
                self.matches.append(c["exact"])
        res["ratios"], res["token_checks"] = rt, checks

    def logits_check(self, fused, decs: dict, B, steps=8):
        """Teacher-forced fused logits of each fast decoder vs the reference for `steps` steps (both fed the
        reference's greedy tokens, so differences never compound), with two calibrations: the same reference
        run with Hugging Face's eager attention instead of sdpa (how far two correct bf16 implementations of the
        same model already disagree) and the reference's own top-1 / top-2 logit gap (how near-tied the argmax is).
        """
        prompts = make_prompts(
            N_SPEC, B, self.args.prompt_len, self.vocab, seed=1000 + B, vary=self.args.vary
        )
        models = list(fused.models)
        s = fused.start_decoding(prompts)
        zs = {name: d.start_decoding(prompts)[0] for name, d in decs.items()}
        eager = None
        saved = [m.config._attn_implementation for m in models]
        try:  # the reference with eager attention: a second correct bf16 implementation
            for m in models:
                m.config._attn_implementation = "eager"
            eager = fused.start_decoding(prompts)
        except Exception as e:  # noqa: BLE001 - a calibration only
            self.log("eager-attention calibration unavailable:", type(e).__name__, e)
        finally:
            for m, a in zip(models, saved):
                m.config._attn_implementation = a
        acc = {name: {"max": 0.0, "rms": 0.0, "agree": []} for name in [*decs, "hf-eager"]}
        gaps = []

        def add(name, ref, z):
            z = z.to(ref.device).float()
            d = acc[name]
            d["max"] = max(d["max"], (ref - z).abs().max().item() / max(ref.abs().max().item(), 1e-12))
            d["rms"] = max(d["rms"], ((ref - z).norm() / ref.norm().clamp(min=1e-12)).item())
            d["agree"].append(float((ref.argmax(-1) == z.argmax(-1)).float().mean()))

        for _ in range(steps):
            ref = s.logits.float()
            top2 = ref.topk(2, dim=-1).values
            gaps.append(((top2[:, 0] - top2[:, 1]) / ref.std(-1)).median().item())
            for name, z in zs.items():
                add(name, ref, z)
            if eager is not None:
                add("hf-eager", ref, eager.logits)
            t = ref.argmax(-1)
            s = fused.decode_step(s, t)
            zs = {name: d.decode_step(t)[0] for name, d in decs.items()}
            if eager is not None:
                for m in models:
                    m.config._attn_implementation = "eager"
                try:
                    eager = fused.decode_step(eager, t)
                finally:
                    for m, a in zip(models, saved):
                        m.config._attn_implementation = a
        out = {"steps": steps, "top1_top2_gap_in_logit_std_median": round(statistics.median(gaps), 4)}
        for name, d in acc.items():
            if d["agree"]:
                out[name] = {
                    "max_rel_diff": round(d["max"], 6),
                    "rms_rel_diff": round(d["rms"], 6),
                    "argmax_agree": round(sum(d["agree"]) / len(d["agree"]), 4),
                }
        # the plain fast path's numbers at the top level, as before
        if "fast" in out:
            out["max_rel_diff"], out["argmax_agree"] = (
                out["fast"]["max_rel_diff"],
                out["fast"]["argmax_agree"],
            )
        return out

    # ------------------------------------------------------------------ one shape
    def shape(self, shape):
        from ultrafuser.modeling.fast import FastFusedDecoder

        a = self.args
        dev = torch.device(a.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
        so = self.out["shapes"].setdefault(shape, {})
        t = time.perf_counter()
        models = build_models(shape, 1 if a.lora_only else N_SPEC, dev, dtype)
        sync(dev)
        so["build_s"] = round(time.perf_counter() - t, 1)
        self.vocab = SHAPES[shape]["vocab_size"]
        P = model_bytes(models[:1])
        so["params_per_model"] = sum(p.numel() for p in models[0].parameters())
        so["bytes_per_model"] = P
        self.log(
            f"{shape}: built {len(models)} models ({so['params_per_model'] / 1e6:.1f} M params each) in {so['build_s']} s"
        )
        batches = [b for b in a.batches]
        # the static caches hold exactly the longest prompt (varied prompts get per-specialist prefixes) + the new tokens
        max_len = a.prompt_len + (2 * N_SPEC if a.vary else 0) + a.steps
        if dev.type == "cuda":  # drop batch sizes whose caches cannot fit next to the weights
            free = torch.cuda.mem_get_info(dev)[0]
            keep = []
            for B in batches:
                need = 3 * kv_bytes(models[0], B, max_len) * 2.2 + (1 << 30) * 3
                (
                    keep.append(B)
                    if need < free
                    else self.log(f"skip batch {B}: KV caches need ~{need / 2**30:.0f} GiB")
                )
            batches = keep
        mb = max(batches)
        # one weights mode for single and fused, so that their ratio compares like with like
        weights, also_refs, also_sdpa = a.weights, a.also_refs, a.also_sdpa
        if weights == "auto":
            weights = "copy"
            if dev.type == "cuda":
                free = torch.cuda.mem_get_info(dev)[0]
                kv = kv_bytes(models[0], mb, math.ceil(max_len / 128) * 128)  # one model's static cache
                base = (
                    3 * kv_bytes(models[0], mb, max_len) + 4 * kv + (6 << 30)
                )  # reference caches + fused/single + slack
                copies = (N_SPEC + 1) * P * 1.05  # stacked copies for the fused and the single decoder
                extra = 3 * kv  # the static caches of one more fused decoder (refs / sdpa variants)
                if copies + base > free:
                    weights, copies = "refs", 0
                # the sdpa variant holds its own stacked copy of the weights when weights="copy"
                sdpa_copy = N_SPEC * P * 1.05 if weights == "copy" else 0
                if copies + base + extra + sdpa_copy > free:
                    also_sdpa = False
                if copies + base + extra * (1 + also_sdpa) + (sdpa_copy if also_sdpa else 0) > free:
                    also_refs = False
                self.log(
                    f"free {free / 2**30:.0f} GiB: fast weights={weights}, also refs={also_refs}, sdpa={also_sdpa}"
                )
        so["fast_weights"] = weights
        kv_token = kv_bytes(models[0], 1, 1)  # KV bytes per token and row, one model

        def kvb(B):
            return kv_token * B * (a.prompt_len + a.steps // 2)

        def bytes_of(mode, B):
            for tag in ("-eager", "-refs", "-sdpa", "-kvmodel", "-memberheads", "-lowp", "-noadapters",
                        f"-b{a.also_bucket}"):
                mode = mode.replace(tag, "")
            n = 1 if mode.endswith("single") else N_SPEC
            if mode.endswith("lora"):
                return self.lora_bytes + N_SPEC * kvb(B)
            return n * (P + kvb(B))

        fkw = {"cpu_matmul": a.cpu_matmul, "lora_precision": a.lora_precision, "kv_cache_dtype": a.kv_cache_dtype,
               "decode_attention": a.decode_attention}
        # --also-bucket: the fast decoders again with a fixed attention bucket (only where CUDA graphs bucket it)
        bucket_tag = f"-b{a.also_bucket}" if a.also_bucket and dev.type == "cuda" else ""
        kvm = {**fkw, "kv_cache_dtype": "model"}  # --also-kv-model: the same decoders with the cache in the model dtype
        if not a.lora_only:  # the dense phase (three models)
            fused = make_fused(models)
            single = make_fused(models[:1], gate="uniform")
            decs = {}
            try:
                decs["fused"] = FastFusedDecoder(fused, max_batch=mb, max_len=max_len, weights=weights, **fkw)
                decs["single"] = FastFusedDecoder(single, max_batch=mb, max_len=max_len, weights=weights, **fkw)
                if weights == "copy" and also_refs:
                    decs["refs"] = FastFusedDecoder(fused, max_batch=mb, max_len=max_len, weights="refs", **fkw)
                if a.also_kv_model:
                    decs["fused_kvm"] = FastFusedDecoder(fused, max_batch=mb, max_len=max_len, weights=weights, **kvm)
                    decs["single_kvm"] = FastFusedDecoder(single, max_batch=mb, max_len=max_len, weights=weights,
                                                          **kvm)
                if also_sdpa:
                    decs["sdpa"] = FastFusedDecoder(
                        fused, max_batch=mb, max_len=max_len, weights=weights, **{**fkw, "decode_attention": "sdpa"}
                    )
            except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                msg = f"building fast decoders: {type(e).__name__}: {e}"
                self.log("ERROR", msg)
                traceback.print_exc()
                self.out["errors"].append(msg)
            so["fast_groups"] = decs["fused"].describe_groups() if "fused" in decs else None
            if "fused" in decs:  # teacher-forced logits before anything is timed (a bf16 check needs them)
                try:
                    checked = {"fast": decs["fused"], **({"fast-sdpa": decs["sdpa"]} if "sdpa" in decs else {})}
                    so["logits_check_dense_b1"] = self.logits_check(fused, checked, 1)
                except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                    msg = f"logits check: {type(e).__name__}: {e}"
                    self.log("ERROR", msg)
                    traceback.print_exc()
                    self.out["errors"].append(msg)

            modes = {}
            if "naive" in a.paths:
                modes["naive-single"] = lambda p, s: reference_stream(single, first_only(p), s)
                modes["naive-fused"] = lambda p, s: reference_stream(fused, p, s)
            if "fast" in a.paths:
                if "single" in decs:
                    modes["fast-single"] = lambda p, s: decs["single"].stream(first_only(p), s)
                if "fused" in decs:
                    modes["fast-fused"] = lambda p, s: decs["fused"].stream(p, s)
                if "refs" in decs:
                    modes["fast-fused-refs"] = lambda p, s: decs["refs"].stream(p, s)
                if "sdpa" in decs:
                    modes["fast-fused-sdpa"] = lambda p, s: decs["sdpa"].stream(p, s)
                if "fused_kvm" in decs:
                    modes["fast-single-kvmodel"] = lambda p, s: decs["single_kvm"].stream(first_only(p), s)
                    modes["fast-fused-kvmodel"] = lambda p, s: decs["fused_kvm"].stream(p, s)
                if bucket_tag:
                    for m in ("single", "fused"):
                        if m in decs:
                            modes[f"fast-{m}{bucket_tag}"] = with_bucket(decs[m], a.also_bucket, modes[f"fast-{m}"])

            def eager_fused():
                d = FastFusedDecoder(fused, max_batch=mb, max_len=max_len, weights=weights, cuda_graphs=False, **fkw)
                return lambda p, s: d.stream(p, s)

            def eager_single():
                d = FastFusedDecoder(single, max_batch=mb, max_len=max_len, weights=weights, cuda_graphs=False, **fkw)
                return lambda p, s: d.stream(first_only(p), s)

            fallbacks = {"fast-fused": eager_fused, "fast-single": eager_single}  # if CUDA graphs fail
            self.phase(so, f"{shape} dense", modes, batches, dev, bytes_of, a.reps, fallbacks)
            so["cpu_matmul"] = {k: d.cpu_matmul_choices() for k, d in decs.items()}
            for B in batches:
                if f"batch{B}" in so:
                    self.ratios(so[f"batch{B}"], B)
            # larger batches, fast path only (the reference's dynamic caches would not fit next to the static ones)
            extra = [B for B in a.extra_batches if B not in batches]
            if extra and "fast" in a.paths and self.left() > a.reserve_s + 40:
                decs.clear()
                modes.clear()
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                for B in extra:
                    if self.left() < a.reserve_s + 30:
                        break
                    ml = max_len
                    if (
                        dev.type == "cuda"
                        and 4 * kv_bytes(models[0], B, ml + 128) + (3 << 30) > torch.cuda.mem_get_info(dev)[0]
                    ):
                        self.log(f"skip extra batch {B}: not enough memory for the static caches")
                        continue
                    try:
                        xd = {
                            "fused": FastFusedDecoder(fused, max_batch=B, max_len=ml, weights="refs", **fkw),
                            "single": FastFusedDecoder(single, max_batch=B, max_len=ml, weights="refs", **fkw),
                        }
                        xm = {
                            "fast-single": lambda p, s, xd=xd: xd["single"].stream(first_only(p), s),
                            "fast-fused": lambda p, s, xd=xd: xd["fused"].stream(p, s),
                        }
                        self.phase(so, f"{shape} dense (fast only, weights=refs)", xm, [B], dev, bytes_of, a.reps)
                        self.ratios(so[f"batch{B}"], B)
                        so[f"batch{B}"]["note"] = "fast path only, weights='refs'"
                    except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                        msg = f"{shape} extra batch {B}: {type(e).__name__}: {e}"
                        self.log("ERROR", msg)
                        traceback.print_exc()
                        self.out["errors"].append(msg)
                    xd = xm = None
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            self.save()

        # ---- LoRA-shared phase: base = model 0 + --lora-adapters adapters; the other two models are freed first
        if a.lora_rank and self.left() > a.reserve_s + 10:
            if not a.lora_only:
                del modes, fused, decs
            single_dec = None
            models = models[:1]
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            try:
                adapters = lora_adapters(a.lora_adapters)
                base = add_lora(models[0], a.lora_rank, std=SHAPES[shape]["std"], names=[n for n in adapters if n])
                self.lora_bytes = model_bytes([base])
                so["lora"] = {
                    "rank": a.lora_rank,
                    "adapters": [n or "(bare base)" for n in adapters],
                    "targets": "q,k,v,o,gate,up,down",
                    "adapter_bytes": self.lora_bytes - P,
                }
                lweights = weights
                if a.weights == "auto" and dev.type == "cuda" and weights == "refs":
                    # one base now: both decoders' copies (fused q|k|v, gate|up; each member's LoRA A in the
                    # base's rows) usually fit where three models' did not; single and LoRA-shared alike
                    free = torch.cuda.mem_get_info(dev)[0]
                    kv = kv_bytes(models[0], mb, math.ceil(max_len / 128) * 128)
                    need = 2 * P * 1.05 + 3 * kv_bytes(models[0], mb, max_len) + 4 * kv + (6 << 30)
                    lweights = "copy" if need < free else "refs"
                    self.log(f"lora phase: free {free / 2**30:.0f} GiB: fast weights={lweights}")
                so["lora"]["fast_weights"] = lweights
                lfused = make_fused([base] * N_SPEC, adapters=adapters)
                lsingle = make_fused([base], adapters=[None], gate="uniform")
                ldec = FastFusedDecoder(lfused, max_batch=mb, max_len=max_len, weights=lweights, **fkw)
                single_dec = FastFusedDecoder(lsingle, max_batch=mb, max_len=max_len, weights=lweights, **fkw)
                so["lora"]["fast_groups"] = ldec.describe_groups()
                lmodes = {}
                so["lora"]["bucket"] = ldec.bucket
                if "naive" in a.paths:
                    lmodes["naive-lora"] = lambda p, s: reference_stream(lfused, p, s)
                if "fast" in a.paths:
                    lmodes["fast-lora"] = lambda p, s: ldec.stream(p, s)
                    lmodes["fast-single"] = lambda p, s: single_dec.stream(first_only(p), s)
                    if a.also_kv_model:
                        kd = {"lora": FastFusedDecoder(lfused, max_batch=mb, max_len=max_len, weights=lweights, **kvm),
                              "single": FastFusedDecoder(lsingle, max_batch=mb, max_len=max_len, weights=lweights,
                                                         **kvm)}
                        lmodes["fast-lora-kvmodel"] = lambda p, s, kd=kd: kd["lora"].stream(p, s)
                        lmodes["fast-single-kvmodel"] = lambda p, s, kd=kd: kd["single"].stream(first_only(p), s)
                    if a.also_member_heads:
                        md = FastFusedDecoder(lfused, max_batch=mb, max_len=max_len, weights=lweights,
                                              mix_before_head=False, **fkw)
                        lmodes["fast-lora-memberheads"] = lambda p, s, md=md: md.stream(p, s)
                    if a.also_lora_model:
                        lp = FastFusedDecoder(lfused, max_batch=mb, max_len=max_len, weights=lweights,
                                              **{**fkw, "lora_precision": "model"})
                        lmodes["fast-lora-lowp"] = lambda p, s, lp=lp: lp.stream(p, s)
                    if bucket_tag:
                        for m, d in (("lora", ldec), ("single", single_dec)):
                            lmodes[f"fast-{m}{bucket_tag}"] = with_bucket(d, a.also_bucket, lmodes[f"fast-{m}"])
                    if a.also_no_adapters:  # the same three rows per prompt through the base, no low-rank terms
                        na = FastFusedDecoder(make_fused([base] * N_SPEC, adapters=[None] * N_SPEC), max_batch=mb,
                                              max_len=max_len, weights=lweights, **fkw)
                        lmodes["fast-lora-noadapters"] = lambda p, s, na=na: na.stream(p, s)
                lso = so.setdefault("lora_phase", {})
                self.phase(lso, f"{shape} lora", lmodes, batches, dev, bytes_of, a.reps)
                so["lora"]["cpu_matmul"] = {"lora": ldec.cpu_matmul_choices(),
                                            "single": single_dec.cpu_matmul_choices()}
                for B in batches:
                    if f"batch{B}" in lso:
                        self.ratios(lso[f"batch{B}"], B)
                if self.left() > a.reserve_s:
                    so["logits_check_lora_b1"] = self.logits_check(lfused, {"fast": ldec}, 1)
            except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                msg = f"{shape} lora phase: {type(e).__name__}: {e}"
                self.log("ERROR", msg)
                traceback.print_exc()
                self.out["errors"].append(msg)
        self.save()
        del models
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def table(self):
        lines = []
        e = self.out["env"]
        lines.append(
            f"# {e.get('device_name')}  bw {e.get('copy_bandwidth_GBps')} GB/s  {e.get('dtype')}  "
            f"prompt {e.get('prompt_len')}  steps {e.get('steps')}  tokens_match={self.out['tokens_match']}"
        )
        lines.append(
            f"{'shape':14} {'phase':6} {'B':>3} {'mode':16} {'ms/step':>9} {'tok/s':>9} {'floor%':>7} {'prefill ms':>10}"
        )
        for shape, so in self.out["shapes"].items():
            for phase, d in (("dense", so), ("lora", so.get("lora_phase", {}))):
                for bk, res in d.items():
                    if not bk.startswith("batch"):
                        continue
                    B = int(bk[5:])
                    for mode, r in res.items():
                        if mode in ("ratios", "token_checks") or not isinstance(r, dict):
                            continue
                        if "ms_step" in r:
                            lines.append(
                                f"{shape:14} {phase:6} {B:>3} {mode:16} {r['ms_step']:>9.2f} {r['tok_s_total']:>9.1f} "
                                f"{100 * r['frac_floor']:>6.1f}% {r['prefill_ms_median']:>10.1f}"
                            )
                        elif "error" in r:
                            lines.append(f"{shape:14} {phase:6} {B:>3} {mode:16} ERROR {r['error'][:60]}")
                    for k, v in res.get("ratios", {}).items():
                        lines.append(f"{'':14} {phase:6} {B:>3}   {k} = {v}")
                    for k, v in res.get("token_checks", {}).items():
                        lines.append(
                            f"{'':14} {phase:6} {B:>3}   tokens {k}: exact={v['exact']} "
                            f"first_divergence={v['first_divergence']} prefix={v['matched_prefix_frac']}"
                        )
            for k in ("logits_check_dense_b1", "logits_check_lora_b1"):
                if k in so:
                    lines.append(f"{shape:14} {k}: {so[k]}")
            if so.get("fast_weights"):
                lines.append(f"{shape:14} fast weights={so['fast_weights']} groups={so.get('fast_groups')}")
        if self.out.get("errors"):
            lines.append("errors: " + " | ".join(e[:160] for e in self.out["errors"]))
        return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=list(SHAPES), help="repeatable; default tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument(
        "--batches", default=None, help="comma-separated batch sizes (default 1,16; tiny on CPU: 3)"
    )
    ap.add_argument(
        "--vary",
        action="store_true",
        help="prompt lengths differ per row and specialist (default for tiny on CPU)",
    )
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (tiny on CPU: 32)")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="measured repetitions per mode, interleaved (default 2; tiny on CPU: 1)",
    )
    ap.add_argument(
        "--naive-reps", type=int, default=None, help="repetitions of the (slow) naive modes (default: --reps)"
    )
    ap.add_argument(
        "--extra-batches", default="", help="comma-separated larger batch sizes run on the fast path only"
    )
    ap.add_argument(
        "--print-table", nargs="+", default=None, metavar="JSON", help="print the tables of saved runs"
    )
    ap.add_argument("--paths", default="naive,fast")
    ap.add_argument("--weights", default="auto", choices=["auto", "copy", "refs"])
    ap.add_argument("--cpu-matmul", default="auto", choices=["auto", "rule", "copies", "w_xt", "linear"],
                    help="FastFusedDecoder(cpu_matmul=...): how CPU decode steps run their matmuls")
    ap.add_argument("--also-refs", action="store_true", help="also time fast-fused with weights='refs'")
    ap.add_argument(
        "--also-sdpa", action="store_true",
        help="also time fast-fused with decode_attention='sdpa' (the CUDA default since 2026-11-27: with "
             "--decode-attention bmm this times the two side by side)"
    )
    ap.add_argument("--lora-rank", type=int, default=16, help="0 skips the LoRA-shared phase")
    ap.add_argument("--lora-precision", default="auto", choices=["auto", "adapter", "model"],
                    help="FastFusedDecoder(lora_precision=...): 'model' runs the low-rank terms in the model dtype "
                         "(each member's A in the base's GEMM) even in fp32")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "model", "float32"],
                    help="FastFusedDecoder(kv_cache_dtype=...): 'auto' keeps a half-precision model's cache (and "
                         "decode attention) in fp32 on the CPU, the model dtype elsewhere")
    ap.add_argument("--also-kv-model", action="store_true",
                    help="also time the fast decoders with kv_cache_dtype='model' (modes *-kvmodel), side by side")
    ap.add_argument("--also-member-heads", action="store_true",
                    help="also time LoRA-shared with mix_before_head=False (every member's logits formed; mode "
                         "fast-lora-memberheads), side by side")
    ap.add_argument("--lora-adapters", type=int, default=3, choices=[1, 2, 3],
                    help="how many of the three LoRA-shared specialists have an adapter (default 3, like the "
                         "embedded default; 2: the first is the bare base, as in runs before 2026-11-27)")
    ap.add_argument("--also-lora-model", action="store_true",
                    help="also time LoRA-shared with lora_precision='model' (mode fast-lora-lowp: every low-rank "
                         "product in the model dtype, B too), side by side")
    ap.add_argument("--also-no-adapters", action="store_true",
                    help="also time the LoRA-shared group with no adapter at all (mode fast-lora-noadapters: three "
                         "rows per prompt through the base, no low-rank terms: what the adapters themselves cost)")
    ap.add_argument("--decode-attention", default="auto", choices=["auto", "bmm", "sdpa"],
                    help="FastFusedDecoder(decode_attention=...) for every fast decoder (auto: sdpa on CUDA, bmm on "
                         "the CPU; --also-sdpa: the dense phase's fused step with sdpa as well)")
    ap.add_argument("--also-bucket", type=int, default=None, metavar="N",
                    help="CUDA graphs: also time the fast decoders with a fixed attention bucket of N slots (modes "
                         "*-bN; the default is growing buckets, see fast.attention_length), side by side")
    ap.add_argument("--lora-only", action="store_true",
                    help="build one model and run only the LoRA-shared phase (single vs LoRA-shared)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: 1 for tiny, else torch's)"
    )
    ap.add_argument("--bw-gib", type=float, default=None)
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; later work is skipped past it")
    ap.add_argument("--reserve-s", type=float, default=30.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.print_table:
        for f in a.print_table:
            try:
                b = Bench(a)
                b.out = json.loads(Path(f).read_text())
                print(f"== {f}")
                print(b.table())
            except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                print(f"== {f}: cannot read ({type(e).__name__}: {e})")
        return None
    a.shape = a.shape or ["tiny"]
    quick = a.shape == ["tiny"] and torch.device(a.device).type == "cpu"  # the < 1 min correctness contract
    a.batches = [int(x) for x in (a.batches or ("3" if quick else "1,16")).split(",") if x]
    a.vary = a.vary or quick
    a.prompt_len = a.prompt_len or (32 if quick else 256)
    a.reps = a.reps or (1 if quick else 2)
    a.naive_reps = a.naive_reps or a.reps
    a.extra_batches = [int(x) for x in a.extra_batches.split(",") if x]
    a.paths = set(a.paths.split(","))
    if a.dtype is None:
        a.dtype = "bfloat16" if torch.device(a.device).type == "cuda" else "float32"
    if a.threads is None and quick:
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    b = Bench(a)
    b.env()
    b.out["args"] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()}
    for shape in a.shape:
        if shape != a.shape[0] and b.left() < a.reserve_s + 120:
            b.log(f"time budget: skipping {shape}")
            b.out["errors"].append(f"skipped {shape}: time budget")
            continue
        try:
            b.shape(shape)
        except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
            msg = f"{shape}: {type(e).__name__}: {e}"
            b.log("ERROR", msg)
            traceback.print_exc()
            b.out["errors"].append(msg)
        b.save()
    b.save()
    print(b.table(), flush=True)
    return b.out


if __name__ == "__main__":
    out = main()
    sys.exit(0)
