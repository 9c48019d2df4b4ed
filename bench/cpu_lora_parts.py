"""Where a LoRA-shared CPU decode step's time goes, by ablation: the same decoder run with parts of the low-rank
path switched off, interleaved in one process, median ms per decode step.

    python bench/cpu_lora_parts.py [--batches 1,4 --reps 4 --prompt-len 64 --steps 32 --json OUT.json]

Modes (one random bf16 base of the SmolLM2-135M shape + three random r-16 adapters on all seven projections, as
`bench/decode.py --lora-only`):

- `single`: one model (the base) — the reference of issue 8's "LoRA-shared ≥ 0.6 × single" on the CPU;
- `lora`: the three specialists as one group (each member's x·A in the base's product, (x·A)·B in fp32 per
  projection, `fast_llama.add_lora_b32`: the C kernel of `cpu_kernels` where it builds, else PyTorch ops);
- `lora-ops`: the same with the PyTorch ops (`fast_llama.add_lora_b32_ops`: one fp32 product per projection);
- `lora-no-b`: the same with `add_lora_b32` a no-op — the x·A columns are computed, the B products and their adds
  are not;
- `lora-b-bmm-only`: only the B products (no x·A gather, no add);
- `lora-b-no-add`: x·A gathered and the B products, no add into the output;
- `noadapters`: the same three rows per prompt through the base with no adapter at all.

The ablated modes compute wrong values (their tokens are not checked); they exist to split the step's cost:
lora − lora-no-b is what the B products and their adds cost, lora-no-b − noadapters what the x·A columns cost,
noadapters − single what three rows per prompt (bigger GEMMs, three KV caches) cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES, add_lora, build_models, first_only, lora_adapters, make_fused, make_prompts, timed_stream

from ultrafuser.modeling import fast_llama
from ultrafuser.modeling.fast import FastFusedDecoder
from ultrafuser.modeling.generation import SamplingParams


def b_part(skip: set):
    """add_lora_b32 with some of its three parts (x·A gather, B product, add) left out."""

    def run(ye, plan):
        xa, src, B, d, d4, (size, stride, col0) = plan[:6]
        o = ye.storage_offset()
        if "xa" not in skip:
            if isinstance(src, torch.Tensor):
                xa.copy_(torch.take(ye, src))
            else:
                src[0].copy_(ye.as_strided(src[1], src[2], o + src[3]))
        if "bmm" not in skip:
            torch.bmm(xa, B, out=d)
        if "add" not in skip:
            y = ye.as_strided(size, stride, o + col0)
            y.copy_(d4.add_(y))

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--reps", type=int, default=4, help="measured repetitions per mode, interleaved")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    dev, dt = torch.device("cpu"), getattr(torch, a.dtype)
    batches = [int(b) for b in a.batches.split(",")]
    base = build_models(a.shape, 1, dev, dt)[0]
    adapters = lora_adapters(3)
    base = add_lora(base, a.rank, std=SHAPES[a.shape]["std"], names=[n for n in adapters if n])
    ml, mb = a.prompt_len + a.steps + 8, max(batches)
    decs = {
        "lora": FastFusedDecoder(make_fused([base] * 3, adapters=adapters), max_batch=mb, max_len=ml),
        "single": FastFusedDecoder(make_fused([base], adapters=[None], gate="uniform"), max_batch=mb, max_len=ml),
        "noadapters": FastFusedDecoder(make_fused([base] * 3, adapters=[None] * 3), max_batch=mb, max_len=ml),
    }
    real = fast_llama.add_lora_b32
    modes = {  # name -> (decoder, add_lora_b32 to use)
        "single": ("single", real),
        "lora": ("lora", real),
        "lora-ops": ("lora", fast_llama.add_lora_b32_ops),
        "lora-no-b": ("lora", lambda *args, **kw: None),
        "lora-b-bmm-only": ("lora", b_part({"xa", "add"})),
        "lora-b-no-add": ("lora", b_part({"add"})),
        "noadapters": ("noadapters", real),
    }
    params = SamplingParams(max_new_tokens=a.steps, ignore_eos=True)
    out = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "shape": a.shape,
                   "dtype": a.dtype, "prompt_len": a.prompt_len, "steps": a.steps, "rank": a.rank,
                   "date": time.strftime("%Y-%m-%d")}, "batches": {}}
    try:
        for B in batches:
            prompts = make_prompts(3, B, a.prompt_len, SHAPES[a.shape]["vocab_size"], seed=B)
            steps, toks = {m: [] for m in modes}, {}
            for rep in range(a.reps + 1):  # the first round warms up
                for m, (d, fn) in modes.items():
                    fast_llama.add_lora_b32 = fn
                    p = first_only(prompts) if m == "single" else prompts[:]
                    _, st, toks[m] = timed_stream(decs[d].stream(p, params), dev)
                    if rep:
                        steps[m] += st
            ms = {m: round(statistics.median(v), 3) for m, v in steps.items()}
            kernel_on = any(plan[6] is not None for L in decs["lora"].groups[0].layers for p in L.values()
                            for plan in getattr(p, "_b32_plans", {}).values())
            r = {"ms_step": ms,
                 "lora_tput_vs_single": round(ms["single"] / ms["lora"], 3),
                 "b_products_and_adds_ms": round(ms["lora"] - ms["lora-no-b"], 3),
                 "xa_columns_ms": round(ms["lora-no-b"] - ms["noadapters"], 3),
                 "three_rows_per_prompt_ms": round(ms["noadapters"] - ms["single"], 3),
                 "kernel_gain_ms": round(ms["lora-ops"] - ms["lora"], 3),
                 "kernel_in_use": kernel_on,
                 # the kernel gives the ops' bits: the same greedy tokens
                 "kernel_tokens_match": toks["lora"] == toks["lora-ops"]}
            out["batches"][str(B)] = r
            print(f"B={B}: " + ", ".join(f"{m} {v:.2f}" for m, v in ms.items()) + " ms/step")
            print(f"      LoRA-shared / single throughput {r['lora_tput_vs_single']}; B products + adds "
                  f"{r['b_products_and_adds_ms']} ms, x·A columns {r['xa_columns_ms']} ms, three rows per prompt "
                  f"{r['three_rows_per_prompt_ms']} ms; the C kernel (in use: {kernel_on}) gains {r['kernel_gain_ms']} ms over "
                  f"the ops, same tokens: {r['kernel_tokens_match']}", flush=True)
    finally:
        fast_llama.add_lora_b32 = real
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
